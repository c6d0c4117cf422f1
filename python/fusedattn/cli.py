"""The ``fusedattn`` command line (also ``python -m fusedattn``).

``fusedattn bench`` times fusedattn against naive NumPy and, when installed, torch's
``scaled_dot_product_attention``, after checking that fusedattn's answer is right.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from typing import List, Optional

import numpy as np

from . import _bench

__all__ = ["main"]

# Columns in display order; _bench.LIBRARIES is the (different) order in which they are measured.
_DISPLAY_ORDER = ("fusedattn", "naive", "torch")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``fusedattn`` command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Exit code 0 on success, 1 when a benchmark found fusedattn's result wrong, 2 for a usage error,
    130 when interrupted.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    return args.run(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedattn", description="fusedattn: fused softmax attention for NumPy.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = commands.add_parser(
        "bench",
        help="time fusedattn against naive NumPy and torch",
        description="Time fusedattn against naive NumPy and torch's scaled_dot_product_attention (when "
                    "installed), best of several runs after a warm-up, each result first checked "
                    "against the naive one. FLOPs = 4*B*H*Lq*Lk*D, halved for causal shapes.",
    )
    which = bench.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="a small set of shapes (under a minute on 2 cores)")
    which.add_argument("--shapes", type=_shape_list, metavar="LIST",
                       help="comma-separated BxHxLqxLkxD, trailing 'c' for causal, "
                            "e.g. '1x8x512x512x64,1x8x1024x1024x64c'")
    bench.add_argument("--dtype", choices=("float32", "float64"),
                       help="dtype of every shape (default: float32, the default set also runs one float64 shape)")
    bench.add_argument("--threads", type=_positive_int, metavar="N",
                       help="threads for every library (default: fusedattn.get_num_threads())")
    bench.add_argument("--json", metavar="FILE", help="also write every row and the environment to FILE as JSON")
    bench.set_defaults(run=_run_bench)
    return parser


def _shape_list(text: str):
    try:
        return [_bench.parse_shape(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _run_bench(args) -> int:
    import fusedattn

    cases = _bench.cases_from(args.shapes, args.dtype, quick=args.quick)
    threads = args.threads or fusedattn.get_num_threads()
    torch, torch_reason = _bench.load_torch()
    libraries = [lib for lib in _bench.LIBRARIES if lib != "torch" or torch is not None]
    ui = _make_ui()
    info = fusedattn.backend_info()

    rows = []
    interrupted = False
    with _bench.limit_threads(threads) as numpy_threads:
        ui.header(_header_lines(info, threads, torch, torch_reason, numpy_threads))
        try:
            with ui.progress(len(cases) * len(libraries)) as step:
                for case in cases:
                    rows.append(_measure_case(case, libraries, threads, torch, step))
        except KeyboardInterrupt:
            interrupted = True  # still report what was measured

    ui.table(_table_columns(libraries), [_table_cells(row, libraries) for row in rows])
    if args.json:
        _write_json(args.json, rows, info, threads, torch, torch_reason, numpy_threads)
        ui.note(f"wrote {len(rows)} rows to {args.json}")
    mismatches = [row["shape"] for row in rows if row["mismatch"]]
    if mismatches:
        ui.note(f"MISMATCH: fusedattn disagrees with naive NumPy for {', '.join(mismatches)}")
    if interrupted:
        return 130
    return 1 if mismatches else 0


def _header_lines(info, threads, torch, torch_reason, numpy_threads) -> List[str]:
    ext = "" if info.get("extension", True) else "  (compiled extension missing: NumPy reference fallback)"
    return [
        f"fusedattn {info['version']}: ISA {info['isa']} (compiled {', '.join(info['compiled_isas'])}; "
        f"CPU supports {', '.join(info['supported_isas'])}), OpenMP {'on' if info['openmp'] else 'off'}{ext}",
        f"threads: {threads} for every library; {numpy_threads}",
        f"numpy {np.__version__}; " + (f"torch {torch.__version__}" if torch is not None
                                        else f"torch column skipped: {torch_reason}"),
        f"{platform.python_implementation()} {platform.python_version()} on {platform.machine()}",
    ]


def _measure_case(case: _bench.Case, libraries, threads: int, torch, step) -> dict:
    """Check, then time, every library on one case; returns the row as stored in the JSON file."""
    shape, dtype = case.shape, np.dtype(case.dtype)
    q, k, v = _bench.make_inputs(shape, dtype)
    # Check before timing: a fast wrong answer must not pass for a result.
    checks = _bench.check_against_naive([lib for lib in libraries if lib != "naive"], case, q, k, v,
                                        threads=threads, torch=torch)
    results = {}
    for lib in libraries:
        step(f"{shape.label} {dtype.name}: {lib}")
        if lib == "naive" and not _bench.naive_fits(shape, dtype):
            gib = _bench.score_bytes(shape, dtype) / 2**30
            results[lib] = {"skipped": f"memory: the score matrix would take {gib:.1f} GiB"}
            continue
        try:
            runner = _bench.make_runner(lib, q, k, v, causal=shape.causal, threads=threads, torch=torch)
            timing = _bench.time_best(runner)
        except Exception as exc:  # one failing library should not cost the other columns
            results[lib] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        results[lib] = {"ms": timing.best_s * 1e3, "gflops": _bench.gflops(shape, timing.best_s),
                        "reps": timing.reps, "inner": timing.inner}
    fused_ms = results.get("fusedattn", {}).get("ms")
    speedups = {}
    for base in ("naive", "torch"):
        base_ms = results.get(base, {}).get("ms")
        speedups[f"speedup_vs_{base}"] = base_ms / fused_ms if fused_ms and base_ms else None
    return {
        "shape": shape.label,
        "batch": shape.batch, "heads": shape.heads, "lq": shape.lq, "lk": shape.lk, "d": shape.d,
        "dtype": dtype.name,
        "causal": shape.causal,
        "threads": threads,
        "gflop": _bench.attention_flops(shape) / 1e9,
        "check": {lib: {"ok": c.ok, "max_abs_err": c.max_abs_err, "scope": c.scope, "status": c.status}
                  for lib, c in checks.items()},
        # Only fusedattn's own check marks the row: torch is the comparison, not the subject.
        "mismatch": checks["fusedattn"].ok is False,
        "results": results,
        **speedups,
    }


def _table_columns(libraries) -> List[str]:
    shown = [lib for lib in _DISPLAY_ORDER if lib in libraries]
    columns = ["shape", "dtype"]
    for lib in shown:
        columns += [f"{lib} ms", "GFLOP/s"]
    columns += [f"vs {lib}" for lib in shown if lib != "fusedattn"]
    return columns + ["check"]


def _table_cells(row: dict, libraries) -> List[str]:
    shown = [lib for lib in _DISPLAY_ORDER if lib in libraries]
    dims = "x".join(str(row[key]) for key in ("batch", "heads", "lq", "lk", "d"))
    cells = [dims + (" causal" if row["causal"] else ""), row["dtype"]]
    for lib in shown:
        result = row["results"].get(lib, {})
        if "ms" in result:
            cells += [_format_ms(result["ms"]), f"{result['gflops']:.1f}"]
        elif "skipped" in result:
            cells += [f"skipped ({result['skipped'].split(':')[0]})", "-"]
        else:
            cells += ["error", "-"]
    for lib in shown:
        if lib != "fusedattn":
            ratio = row[f"speedup_vs_{lib}"]
            cells.append(f"{ratio:.2f}x" if ratio else "-")
    cells.append(_check_cell(row))
    return cells


def _check_cell(row: dict) -> str:
    fused = row["check"]["fusedattn"]
    # The table keeps only the verdict (and the error when it matters); the JSON has the details.
    cell = fused["status"] if row["mismatch"] or fused["ok"] is None else "ok"
    if fused["ok"] and fused["scope"] != "full":
        cell += f" ({fused['scope']})"
    torch_check = row["check"].get("torch")
    if torch_check is not None and torch_check["ok"] is False:
        cell += "; torch differs"
    return cell


def _format_ms(ms: float) -> str:
    if ms < 1:
        return f"{ms:.3f}"
    return f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _write_json(path, rows, info, threads, torch, torch_reason, numpy_threads) -> None:
    document = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend_info": info,
        "threads": threads,
        "numpy_version": np.__version__,
        "numpy_threads": numpy_threads,
        "torch_version": None if torch is None else str(torch.__version__),
        "torch_skipped": torch_reason,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "flops_formula": "4*B*H*Lq*Lk*D, halved for causal",
        "rows": rows,
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, allow_nan=False, default=_json_default)
        handle.write("\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


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

    def progress(self, total: int):
        return _PlainProgress(total)

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
        print(text)


class _PlainProgress:
    def __init__(self, total: int):
        self.total, self.done = total, 0

    def __enter__(self):
        return self

    def __call__(self, description: str):
        self.done += 1
        print(f"[{self.done}/{self.total}] {description}", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        return False


class _RichUI:
    """rich table on stdout and a transient progress bar on stderr."""

    def __init__(self):
        from rich.console import Console

        self.out = Console()
        if not self.out.is_terminal:
            # Redirected to a file or pipe: rich would squeeze the table into 80 columns and elide cells.
            self.out = Console(width=10_000)
        self.err = Console(stderr=True)

    def header(self, lines):
        for line in lines:
            self.out.print(line, highlight=False, markup=False)
        self.out.print()

    def progress(self, total: int):
        return _RichProgress(self.err, total)

    def table(self, columns, rows):
        from rich.table import Table

        from rich import box

        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for i, column in enumerate(columns):
            numeric = 1 < i < len(columns) - 1
            # Wrapping rather than no_wrap: on a narrow terminal a folded number beats an elided one.
            table.add_column(column, justify="right" if numeric else "left", overflow="fold")
        for row in rows:
            style = "bold red" if row[-1].startswith("MISMATCH") else None
            table.add_row(*row, style=style)
        self.out.print(table)

    def note(self, text):
        self.out.print(text, highlight=False, markup=False)


class _RichProgress:
    def __init__(self, console, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)
        self.task = self.progress.add_task("starting", total=total)
        self.started = False

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __call__(self, description: str):
        # Advance for the step just finished, then show the one starting.
        if self.started:
            self.progress.advance(self.task)
        self.started = True
        self.progress.update(self.task, description=description)

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)
