"""The ``fusedattn`` command line (also ``python -m fusedattn``).

``fusedattn bench`` times fusedattn against its peers — onnxruntime's MultiHeadAttention (the ``[bench]``
extra) and torch's ``scaled_dot_product_attention`` where they are installed — and naive NumPy, after
checking every answer, and sets every fusedattn time against the machine's measured fp32 peak or memory
bandwidth. The table fits the terminal (80 columns when it is not one); ``--json`` keeps every field.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import textwrap
import time
from typing import List, Optional

import numpy as np

from . import _bench

__all__ = ["main"]

# Columns in display order; _bench.LIBRARIES is the (different) order in which they are measured.
_DISPLAY_ORDER = ("fusedattn", "onnxruntime", "torch", "naive")

# Short column names and dtypes: the table has to fit 80 columns.
_SHORT = {"onnxruntime": "onnxrt", "fusedattn": "fusedattn", "torch": "torch", "naive": "naive"}
_SHORT_DTYPES = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}

_UTILISATION_FORMULA = (
    "pct_of_peak = GFLOP/s / fp32 FMA peak (float64 rows: / half of it, as a float64 vector holds half the "
    f"lanes); pct_of_bandwidth (rows with Lq <= {_bench.MEMORY_BOUND_MAX_LQ}) = (q+k+v+out bytes) / time / "
    "streaming read bandwidth; peak and bandwidth measured on the same threads as the rows"
)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``fusedattn`` command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Exit code 0 on success, 1 when a benchmark found fusedattn's result wrong or its extra memory over
    the limit, 2 for a usage error (or ``--plot`` without matplotlib), 130 when interrupted.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and usage errors: a return value like every other outcome
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.run(args)
    except KeyboardInterrupt:  # outside the benchmark loop, which reports what it measured itself
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedattn", description="fusedattn: fused softmax attention for NumPy.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = commands.add_parser(
        "bench",
        help="time fusedattn against onnxruntime, torch and naive NumPy",
        description="Time fusedattn against its peers, onnxruntime's MultiHeadAttention (pip install "
                    "onnxruntime onnx, part of fusedattn[bench]) and torch's scaled_dot_product_attention "
                    "(pip install torch), where installed, and naive NumPy: best of several runs after a "
                    "warm-up, each result first checked against the naive one; rows whose repetitions "
                    "disagree widely are flagged NOISY. FLOPs = 4*B*H*Lq*Lk*D, halved for causal shapes. "
                    "fusedattn's GFLOP/s are shown as a percentage of the measured fp32 FMA peak (float64: "
                    f"half of it), or for memory-bound rows (Lq <= {_bench.MEMORY_BOUND_MAX_LQ}) its bytes "
                    "per second as a percentage of the measured read bandwidth ('in cache' when K and V fit "
                    "in the last-level cache; the presets' decode rows are sized past it). The table fits "
                    "the terminal (COLUMNS; 80 when not a terminal). The default set ends with the memory "
                    "check of --memory.",
    )
    which = bench.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="a small set of shapes (under a minute on 2 cores)")
    which.add_argument("--shapes", type=_shape_list, metavar="LIST",
                       help="comma-separated BxHxLqxLkxD, trailing 'c' for causal, "
                            "e.g. '1x8x512x512x64,1x8x1024x1024x64c'")
    which.add_argument("--memory", action="store_true",
                       help=f"only the memory check: run {_bench.MEMORY_CASE.shape.label} "
                            f"{_bench.MEMORY_CASE.dtype.name} in a subprocess and report the memory fusedattn "
                            f"needs beyond its inputs and output (limit {_bench.MEMORY_LIMIT_BYTES / 1e6:.0f} MB)")
    bench.add_argument("--dtype", choices=("float32", "float64"),
                       help="dtype of every shape (default: float32, the default set also runs one float64 shape)")
    bench.add_argument("--threads", type=_positive_int, metavar="N",
                       help="threads for every library (default: fusedattn.get_num_threads())")
    bench.add_argument("--isa", type=_isa_list, metavar="LIST", default=[],
                       help=f"also run fusedattn forced onto each of these ISA paths ({','.join(_bench.ISAS)}), "
                            "shown as fusedattn[NAME] next to the selected path; paths the CPU lacks are skipped")
    bench.add_argument("--json", metavar="FILE", help="also write every row and the environment to FILE as JSON")
    bench.add_argument("--plot", metavar="FILE.png",
                       help="also draw GFLOP/s per shape and library against the fp32 peak (needs matplotlib: "
                            "pip install 'fusedattn[plot]')")
    bench.set_defaults(run=_run_bench, parser=bench)
    return parser


def _shape_list(text: str):
    try:
        return [_bench.parse_shape(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _isa_list(text: str) -> List[str]:
    names = []
    for part in text.split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name not in _bench.ISAS:
            raise argparse.ArgumentTypeError(f"unknown ISA {part.strip()!r}; expected some of {', '.join(_bench.ISAS)}")
        if name not in names:
            names.append(name)
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    # argparse's own format, for the combinations it cannot express
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


def _run_bench(args) -> int:
    import fusedattn

    if args.memory and (args.plot or args.isa or args.dtype):
        return _usage_error(args.parser, "--memory runs the memory check alone; it takes no --plot, --isa or --dtype")
    if args.plot:
        from . import plot

        try:
            plot.require_matplotlib()
        except ImportError as exc:
            # Before any measuring: minutes of benchmarks should not end in a missing dependency.
            print(f"{args.parser.prog}: error: {exc}", file=sys.stderr)
            return 2

    threads = args.threads or fusedattn.get_num_threads()
    ui = _make_ui()
    info = fusedattn.backend_info()
    with ui.status("measuring the fp32 peak and the read bandwidth"):
        machine = _bench.measure_machine(threads)
    if args.memory:
        ui.header(_header_lines(info, machine))
        memory = _run_memory_check(ui, threads)
        if args.json:
            _write_json(args.json, _document([], info, machine, memory=memory))
            ui.note(f"wrote the memory check to {args.json}")
        return 1 if memory["ok"] is False else 0

    cases = _bench.cases_from(args.shapes, args.dtype, quick=args.quick, llc_bytes=machine.llc_bytes)
    torch, torch_reason = _bench.load_torch()
    ort, ort_reason = _bench.load_onnxruntime()
    variants, isa_skipped = _isa_variants(args.isa, info)
    libraries = []
    for lib in _bench.LIBRARIES:
        if (lib == "torch" and torch is None) or (lib == "onnxruntime" and ort is None):
            continue
        libraries.append(lib)
        if lib == "fusedattn":
            libraries += variants
    run_memory = not (args.quick or args.shapes)

    rows = []
    memory = None
    interrupted = False
    with _bench.limit_threads(threads) as numpy_threads:
        ui.header(_header_lines(info, machine, threads=threads, torch=torch, torch_reason=torch_reason,
                                numpy_threads=numpy_threads, ort=ort, ort_reason=ort_reason)
                  + [f"--isa {isa} skipped: {reason}" for isa, reason in isa_skipped.items()])
        try:
            with ui.progress(len(cases), len(libraries)) as progress:
                for case in cases:
                    progress.case(f"{case.shape.label} {np.dtype(case.dtype).name}")
                    rows.append(_measure_case(case, libraries, threads, torch, machine, progress))
        except KeyboardInterrupt:
            interrupted = True  # still report what was measured

    columns, cells, dropped = _fit_table(_table_columns(libraries), [_table_cells(row, libraries) for row in rows],
                                         _table_width())
    ui.table(columns, cells)
    for line in _footnotes(machine, rows, dropped):
        ui.note(line)
    if run_memory and not interrupted:
        ui.note("")
        memory = _run_memory_check(ui, threads)
    document = _document(rows, info, machine, threads=threads, torch=torch, torch_reason=torch_reason,
                         ort=ort, ort_reason=ort_reason, numpy_threads=numpy_threads, isas={"requested": list(args.isa),
                                                            "run": [_bench.library_isa(v) for v in variants],
                                                            "skipped": isa_skipped},
                         memory=memory)
    if args.json:
        _write_json(args.json, document)
        ui.note(f"wrote {len(rows)} rows to {args.json}")
    if args.plot and rows:
        from . import plot

        plot.plot_bench(document, args.plot)
        ui.note(f"wrote the plot to {args.plot}")
    mismatches = [row["shape"] for row in rows if row["mismatch"]]
    if mismatches:
        ui.note(f"MISMATCH: fusedattn disagrees with naive NumPy for {', '.join(mismatches)}")
    if interrupted:
        return 130
    return 1 if mismatches or (memory is not None and memory["ok"] is False) else 0


def _isa_variants(requested, info):
    """The fusedattn[isa] libraries to run for ``--isa``, and {isa: why not} for the rest."""
    variants, skipped = [], {}
    for isa in requested:
        reason = _bench.isa_unavailable(isa)
        if reason is None and isa == info["isa"]:
            reason = "it is the selected path, the fusedattn column itself"
        if reason is None:
            variants.append(_bench.fused_variant(isa))
        else:
            skipped[isa] = reason
    return variants, skipped


def _header_lines(info, machine, *, threads=None, torch=None, torch_reason=None, numpy_threads=None, ort=None,
                  ort_reason=None) -> List[str]:
    ext = "" if info.get("extension", True) else "  (compiled extension missing: NumPy reference fallback)"
    lines = [
        f"fusedattn {info['version']}: ISA {info['isa']} (compiled {', '.join(info['compiled_isas'])}; "
        f"CPU supports {', '.join(info['supported_isas'])}), OpenMP {'on' if info['openmp'] else 'off'}{ext}",
        _machine_line(machine),
    ]
    amx = info.get("amx")
    if amx and amx.get("compiled"):
        state = ("available" + (" (software model)" if amx.get("emulated") else "") if not amx["reason"]
                 else f"unavailable, {amx['reason']}")
        lines.append(f"amx: {state}; cpu {'yes' if amx['cpu'] else 'no'}, os {'yes' if amx['os'] else 'no'}")
    if threads is not None:
        lines += [
            f"threads: {threads} for every library; {numpy_threads}",
            f"numpy {np.__version__}; " + (f"onnxruntime {ort.__version__} (MultiHeadAttention)" if ort is not None
                                            else f"onnxruntime column skipped: {ort_reason}"),
            (f"torch {torch.__version__} (scaled_dot_product_attention)" if torch is not None
             else f"torch column skipped: {torch_reason}"),
        ]
    return lines + [f"{platform.python_implementation()} {platform.python_version()} on {platform.machine()}"]


def _machine_line(machine: _bench.Machine) -> str:
    if machine.unavailable:
        return f"peak and bandwidth: n/a, {machine.unavailable}"
    return (f"machine on {machine.threads} thread{'s' if machine.threads > 1 else ''}: fp32 FMA peak "
            f"{machine.fp32_peak_gflops:.1f} GFLOP/s ({machine.isa} path), streaming read "
            f"{machine.read_bandwidth_gbs:.1f} GB/s ({machine.bandwidth_probe_bytes / 2**20:g} MiB buffer)")


def _footnotes(machine: _bench.Machine, rows, dropped=()) -> List[str]:
    lines = _row_notes(rows, dropped)
    if machine.probe_note:
        lines.append(f"NOISY probes: {machine.probe_note}")
    if machine.unavailable or not rows:
        return lines
    lines.append(f"efficiency: fusedattn's GFLOP/s as % of the fp32 peak ({machine.fp32_peak_gflops:.1f} GFLOP/s)")
    if any(row["dtype"] == "float64" for row in rows):
        lines[-1] += f"; float64 rows: % of half that ({machine.peak_gflops(np.float64):.1f} GFLOP/s)"
    if any(row["bound"] == "memory" for row in rows):
        lines.append(f"  memory-bound rows (Lq <= {_bench.MEMORY_BOUND_MAX_LQ}): q+k+v+out bytes per second as % of "
                     f"the read bandwidth ({machine.read_bandwidth_gbs:.1f} GB/s)")
    if any(row.get("cache_resident") for row in rows):
        llc = machine.llc_bytes / 2**20
        lines.append(f"  in cache: K + V under {_bench.CACHE_MARGIN}x the {llc:g} MiB last-level cache, so the bytes "
                     "come (partly) from the cache, not memory; the JSON keeps its pct_of_bandwidth")
    if any(pct > 100 for row in rows for pct in _fused_pcts(row) if not row.get("cache_resident")):
        lines.append("  over 100%: a peak or bandwidth probe slowed by other load (see NOISY)")
    return lines


def _row_notes(rows, dropped) -> List[str]:
    """The details the check column has no room for, and the columns left out to fit the width."""
    lines = []
    for row in rows:
        where = f"{row['shape']} {row['dtype']}"
        for lib, check in row["check"].items():
            if check["ok"] is False:
                lines.append(f"{'MISMATCH' if _is_fusedattn(lib) else 'differs'}: {lib} on {where}: {check['status']}")
        fused = row["check"].get("fusedattn", {})
        if fused.get("ok") and fused.get("scope") != "full":
            lines.append(f"checked on the {fused['scope']} only (the naive scores would not fit): {where}")
        for lib, result in row["results"].items():
            if "skipped" in result and lib != "naive":
                lines.append(f"{lib} skipped on {where}: {result['skipped']}")
            if "error" in result:
                lines.append(f"{lib} failed on {where}: {result['error']}")
        if row.get("noisy"):
            lines.append(f"NOISY: {where}: the repetitions of {', '.join(row['noisy'])} disagree (median over "
                         f"{_bench.NOISY_RATIO:g}x or slowest over {_bench.NOISY_WORST_RATIO:g}x the best): other load? "
                         "Rerun on a quiet machine")
    if dropped:
        lines.append(f"left out to fit {_table_width()} columns: {', '.join(dropped)} (set COLUMNS wider, or see --json)")
    if rows:
        legend = "shape: BxHxLqxLkxD, c = causal; f32 / f64: float32 / float64; vs X: X's time / fusedattn's"
        if any(lib == "onnxruntime" for row in rows for lib in row["results"]):
            legend += "; onnxrt: onnxruntime's MultiHeadAttention"
        lines.append(legend)
    return lines


def _fused_pcts(row: dict) -> List[float]:
    result = row["results"].get("fusedattn", {})
    return [result[key] for key in ("pct_of_peak", "pct_of_bandwidth") if result.get(key) is not None]


def _run_memory_check(ui, threads: int) -> dict:
    case = _bench.MEMORY_CASE
    with ui.status(f"memory check: {case.shape.label} {np.dtype(case.dtype).name} in a subprocess"):
        memory = _bench.measure_extra_memory(case, threads=threads)
    for line in _memory_lines(memory):
        ui.note(line)
    return memory


def _memory_lines(memory: dict) -> List[str]:
    where = f"{memory['shape']} {memory['dtype']}"
    if memory["ok"] is None:
        return [f"memory check ({where}) skipped: {memory['skipped']}"]
    mb = 1e6
    verdict = "ok" if memory["ok"] else "OVER THE LIMIT"
    return [
        f"memory, {where} in a subprocess on {memory['threads']} threads: fusedattn needed "
        f"{memory['extra_bytes'] / mb:.2f} MB beyond its inputs and output "
        f"(limit {memory['limit_bytes'] / mb:.0f} MB: {verdict})",
        f"  peak RSS {memory['rss_peak_bytes'] / mb:.1f} MB - baseline with q, k, v {memory['rss_baseline_bytes'] / mb:.1f} MB "
        f"- output {memory['out_bytes'] / mb:.1f} MB; {memory['seconds']:.1f} s",
        f"  naive NumPy would materialise a {memory['naive_score_bytes'] / 1e9:.1f} GB score matrix (not run)",
    ]


def _measure_case(case: _bench.Case, libraries, threads: int, torch, machine: _bench.Machine, progress) -> dict:
    """Check, then time, every library on one case; returns the row as stored in the JSON file."""
    shape, dtype = case.shape, np.dtype(case.dtype)
    q, k, v = _bench.make_inputs(shape, dtype)
    # Check before timing: a fast wrong answer must not pass for a result.
    unsupported = {lib: _bench.unsupported(lib, case) for lib in libraries}
    checks = _bench.check_against_naive([lib for lib in libraries if lib != "naive" and not unsupported[lib]], case,
                                        q, k, v, threads=threads, torch=torch)
    results = {}
    noisy = []
    for lib in libraries:
        progress.step(lib)
        if unsupported[lib]:
            results[lib] = {"skipped": unsupported[lib]}
            continue
        if lib == "naive" and not _bench.naive_fits(shape, dtype):
            gib = _bench.score_bytes(shape, dtype) / 2**30
            results[lib] = {"skipped": f"memory: the score matrix would take {gib:.1f} GiB"}
            continue
        try:
            with _bench.isa_for(lib):
                runner = _bench.make_runner(lib, q, k, v, causal=shape.causal, threads=threads, torch=torch)
                timing = _bench.time_best(runner, **_bench.timing_budget(lib))
        except Exception as exc:  # one failing library should not cost the other columns
            results[lib] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        results[lib] = {"ms": timing.best_s * 1e3, "gflops": _bench.gflops(shape, timing.best_s),
                        "reps": timing.reps, "inner": timing.inner, "worst_ms": timing.worst_s * 1e3,
                        "noisy": _bench.is_noisy(timing),
                        **_bench.utilisation(shape, dtype, timing.best_s, machine)}
        if results[lib]["noisy"]:
            noisy.append(lib)
    fused_ms = results.get("fusedattn", {}).get("ms")
    for lib in libraries:
        isa = _bench.library_isa(lib)
        if isa is not None and "ms" in results[lib]:
            # Above 1 the forced path is faster than the selected one, below 1 slower.
            results[lib].update(isa=isa, speed_vs_default=fused_ms / results[lib]["ms"] if fused_ms else None)
    speedups = {}
    for base in ("naive", *_bench.PEERS):
        base_ms = results.get(base, {}).get("ms")
        speedups[f"speedup_vs_{base}"] = base_ms / fused_ms if fused_ms and base_ms else None
    return {
        "shape": shape.label,
        "batch": shape.batch, "heads": shape.heads, "lq": shape.lq, "lk": shape.lk, "d": shape.d,
        "dtype": dtype.name,
        "causal": shape.causal,
        "threads": threads,
        "gflop": _bench.attention_flops(shape) / 1e9,
        "bytes_moved": _bench.bytes_moved(shape, dtype),
        "bound": "memory" if _bench.is_memory_bound(shape) else "compute",
        "kv_bytes": _bench.kv_bytes(shape, dtype),
        "cache_resident": _bench.cache_resident(shape, dtype, machine.llc_bytes),
        "check": {lib: {"ok": c.ok, "max_abs_err": c.max_abs_err, "scope": c.scope, "status": c.status}
                  for lib, c in checks.items()},
        # Only fusedattn's own checks mark the row: torch is the comparison, not the subject.
        "mismatch": any(c.ok is False for lib, c in checks.items() if _is_fusedattn(lib)),
        "results": results,
        "noisy": noisy,
        **speedups,
    }


def _is_fusedattn(library: str) -> bool:
    return library == "fusedattn" or _bench.library_isa(library) is not None


def _table_columns(libraries) -> List[tuple]:
    """``(name, priority)`` of each column: when the table is too wide, the highest priority numbers go first."""
    shown = [lib for lib in _DISPLAY_ORDER if lib in libraries]
    columns = [("shape", 0), ("dtype", 0), ("fused ms", 0), ("GFLOP/s", 2), ("efficiency", 1)]
    for variant in _variants(libraries):
        columns += [(f"{variant} GFLOP/s", 5), ("vs default", 4)]
    columns += [(f"{_SHORT[lib]} ms", 3) for lib in shown if lib != "fusedattn"]
    columns += [(f"vs {_SHORT[lib]}", 2 if lib == "naive" else 0) for lib in shown if lib != "fusedattn"]
    return columns + [("check", 0)]


def _variants(libraries) -> List[str]:
    return [lib for lib in libraries if _bench.library_isa(lib) is not None]


def _table_cells(row: dict, libraries) -> List[str]:
    shown = [lib for lib in _DISPLAY_ORDER if lib in libraries]
    fused = row["results"].get("fusedattn", {})
    cells = [row["shape"], _SHORT_DTYPES.get(row["dtype"], row["dtype"]), _ms_cell(fused),
             f"{fused['gflops']:.1f}" if "gflops" in fused else "-", _efficiency_cell(row, fused)]
    for variant in _variants(libraries):
        forced = row["results"].get(variant, {})
        ratio = forced.get("speed_vs_default")
        cells += [f"{forced['gflops']:.1f}" if "gflops" in forced else "error", f"{ratio:.2f}x" if ratio else "-"]
    cells += [_ms_cell(row["results"].get(lib, {})) for lib in shown if lib != "fusedattn"]
    for lib in shown:
        if lib != "fusedattn":
            ratio = row.get(f"speedup_vs_{lib}")
            cells.append(f"{ratio:.2f}x" if ratio else "-")
    cells.append(_check_cell(row))
    return cells


def _ms_cell(result: dict) -> str:
    if "ms" in result:
        return _format_ms(result["ms"])
    return "skipped" if "skipped" in result else "error"


def _table_width() -> int:
    """The terminal's width (the COLUMNS variable first), 80 when stdout is not a terminal."""
    return max(40, shutil.get_terminal_size((80, 24)).columns)


def _fit_table(columns, rows, width: int):
    """Drop the columns of the highest priority numbers (the rightmost first among equals) until the plain
    table, two spaces between columns, fits ``width``; returns ``(names, rows, dropped names)``."""
    keep = list(range(len(columns)))

    def table_width():
        widths = [max(len(columns[i][0]), *(len(r[i]) for r in rows)) if rows else len(columns[i][0]) for i in keep]
        return sum(widths) + 2 * (len(widths) - 1)

    dropped = []
    while table_width() > width:
        candidates = [i for i in keep if columns[i][1] > 0]
        if not candidates:
            break
        worst = max(candidates, key=lambda i: (columns[i][1], i))
        keep.remove(worst)
        dropped.append(columns[worst][0])
    return [columns[i][0] for i in keep], [[r[i] for i in keep] for r in rows], dropped


def _efficiency_cell(row: dict, result: dict) -> str:
    if row["bound"] == "memory" and row.get("cache_resident"):
        return "in cache"
    key, unit = ("pct_of_bandwidth", "bw") if row["bound"] == "memory" else ("pct_of_peak", "peak")
    pct = result.get(key)
    # n/a: the reference fallback has no probes to measure the machine with
    if pct is None:
        return "n/a"
    return f"{pct:.0f}% {unit}" if pct >= 9.5 else f"{pct:.2g}% {unit}"


def _check_cell(row: dict) -> str:
    """ok, MISMATCH or unchecked, and the flags: the details are footnotes (the JSON has them all)."""
    fused = row["check"]["fusedattn"]
    cell = "ok" if fused["ok"] else ("MISMATCH" if fused["ok"] is False else "unchecked")
    if any(check["ok"] is False for lib, check in row["check"].items() if lib != "fusedattn" and _is_fusedattn(lib)):
        cell = "MISMATCH"
    if any(check["ok"] is False for lib, check in row["check"].items() if not _is_fusedattn(lib)):
        cell += " peer!"
    if row.get("noisy"):
        cell += " NOISY"
    return cell


def _format_ms(ms: float) -> str:
    if ms < 1:
        return f"{ms:.3f}"
    return f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _document(rows, info, machine: _bench.Machine, *, threads=None, torch=None, torch_reason=None, ort=None,
              ort_reason=None, numpy_threads=None, isas=None, memory=None) -> dict:
    """Everything a run measured, as written by --json and drawn by --plot."""
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend_info": info,
        "threads": machine.threads if threads is None else threads,
        "roofline": machine.as_json(),
        "numpy_version": np.__version__,
        "numpy_threads": numpy_threads,
        "torch_version": None if torch is None else str(torch.__version__),
        "torch_skipped": torch_reason,
        "onnxruntime_version": None if ort is None else str(ort.__version__),
        "onnxruntime_skipped": ort_reason,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "flops_formula": "4*B*H*Lq*Lk*D, halved for causal",
        "utilisation_formula": _UTILISATION_FORMULA,
        "isas": isas or {"requested": [], "run": [], "skipped": {}},
        "rows": rows,
        "memory": memory,
    }


def _write_json(path, document: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, allow_nan=False, default=_json_default)
        handle.write("\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _wrap(text: str) -> str:
    """A note folded to the table's width, continuation lines indented under it."""
    if len(text) <= _table_width():
        return text
    indent = " " * (len(text) - len(text.lstrip()) + 2)
    return textwrap.fill(text, _table_width(), subsequent_indent=indent, break_on_hyphens=False)


def _make_ui():
    try:
        import rich  # noqa: F401  (only probing whether the optional [bench] extra is installed)
    except ImportError:
        return _PlainUI()
    return _RichUI()


class _PlainUI:
    """Aligned text table on stdout, progress lines on stderr."""

    def header(self, lines):
        for line in lines:
            print(line)
        print()

    def status(self, text: str):
        return _PlainStatus(text)

    def progress(self, cases: int, steps_per_case: int):
        return _PlainProgress(cases)

    def table(self, columns, rows):
        widths = [max(len(str(c)) for c in column) for column in zip(columns, *rows)]
        # Left-align the labels, right-align the numbers so digits line up.
        left = {0, 1, len(columns) - 1}

        def line(cells):
            return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        print(line(columns).rstrip())
        print("  ".join("-" * w for w in widths))
        for row in rows:
            print(line(row).rstrip())

    def note(self, text):
        print(_wrap(text))


class _PlainStatus:
    """One stderr line announcing a wait of a few seconds."""

    def __init__(self, text: str):
        self.text = text

    def __enter__(self):
        print(f"{self.text} ...", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc):
        return False


class _PlainProgress:
    """One stderr line per case: readable in a log file, where a redrawn bar would be noise."""

    def __init__(self, cases: int):
        self.cases, self.done = cases, 0
        self.start = time.perf_counter()

    def __enter__(self):
        return self

    def case(self, label: str):
        self.done += 1
        elapsed = time.perf_counter() - self.start
        print(f"[{self.done}/{self.cases}] {label} ({elapsed:.0f} s elapsed)", file=sys.stderr, flush=True)

    def step(self, library: str):
        pass

    def __exit__(self, *exc):
        return False


class _RichUI:
    """rich table on stdout; a transient progress bar on stderr when it is a terminal."""

    def __init__(self):
        from rich.console import Console

        # The columns were already fitted to this width (_fit_table): rich should neither fold nor elide them.
        self.out = Console(width=_table_width() + 1)
        self.err = Console(stderr=True)

    def header(self, lines):
        for line in lines:
            self.out.print(line, highlight=False, markup=False)
        self.out.print()

    def status(self, text: str):
        if not self.err.is_terminal:
            return _PlainStatus(text)
        return self.err.status(text)

    def progress(self, cases: int, steps_per_case: int):
        # rich draws nothing on a non-terminal stderr (and a transient bar leaves nothing behind),
        # so a redirected run would be silent for minutes: use the log-friendly lines there.
        if not self.err.is_terminal:
            return _PlainProgress(cases)
        return _RichProgress(self.err, cases * steps_per_case)

    def table(self, columns, rows):
        from rich.table import Table
        from rich.text import Text

        from rich import box

        # Two spaces between columns (one of padding, one of the box's blank divider) and none at the edges:
        # the widths _fit_table assumed.
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
        for i, column in enumerate(columns):
            numeric = 1 < i < len(columns) - 1
            # Text, not str: "fusedattn[avx2]" would otherwise be read as markup and vanish.
            table.add_column(Text(column), justify="right" if numeric else "left", no_wrap=True)
        for row in rows:
            style = "bold red" if "MISMATCH" in row[-1] else ("yellow" if "NOISY" in row[-1] else None)
            table.add_row(*map(Text, row), style=style)
        self.out.print(table)

    def note(self, text):
        self.out.print(_wrap(text), highlight=False, markup=False, soft_wrap=True)


class _RichProgress:
    def __init__(self, console, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        # markup=False: the "[avx2]" of a forced path is not a style tag.
        self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)
        self.task = self.progress.add_task("starting", total=total)
        self.label = ""
        self.started = False

    def __enter__(self):
        self.progress.__enter__()
        return self

    def case(self, label: str):
        self.label = label

    def step(self, library: str):
        # Advance for the step just finished, then show the one starting.
        if self.started:
            self.progress.advance(self.task)
        self.started = True
        self.progress.update(self.task, description=f"{self.label}: {library}")

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)
