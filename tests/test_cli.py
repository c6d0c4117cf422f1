"""The ``fusedattn bench`` command line: arguments, JSON, plot, exit codes.

No timing is asserted (the numbers depend on the machine and its load); the probes and timing
budgets are shrunk so the whole file runs in seconds.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import fusedattn
from fusedattn import _backend, _bench, cli

TINY = ["--shapes", "1x1x16x16x8", "--threads", "1"]
needs_extension = pytest.mark.skipif(_backend._core is None, reason="fusedattn's compiled extension is not importable")


@pytest.fixture(autouse=True)
def fast_bench(monkeypatch):
    """Real probes and timings, on budgets that measure nothing well but run everything quickly."""
    real_measure = _bench.measure_machine
    monkeypatch.setattr(_bench, "measure_machine",
                        lambda threads: real_measure(threads, bandwidth_bytes=16 << 20, repeats=1))
    monkeypatch.setattr(_bench, "timing_budget", lambda library, min_reps=3: {"target_s": 0.005, "min_reps": 1})


@pytest.fixture
def no_torch(monkeypatch):
    """Leave the peers out: their columns are covered by test_json_structure, and each run costs time."""
    monkeypatch.setattr(_bench, "load_torch", lambda: (None, "left out by the test"))
    monkeypatch.setattr(_bench, "load_onnxruntime", lambda: (None, "left out by the test"))


def run_json(tmp_path, *args):
    path = tmp_path / "bench.json"
    code = cli.main(["bench", *args, "--json", str(path)])
    return code, (json.loads(path.read_text()) if path.exists() else None)


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------

def parse(*args):
    return cli._build_parser().parse_args(["bench", *args])


def test_shapes_parse_with_causal_suffix():
    args = parse("--shapes", "1x8x512x512x64, 2x4x128x256x32c,1x1x8x8x8C")
    assert [s.dims for s in args.shapes] == [(1, 8, 512, 512, 64), (2, 4, 128, 256, 32), (1, 1, 8, 8, 8)]
    assert [s.causal for s in args.shapes] == [False, True, True]
    assert [s.label for s in args.shapes] == ["1x8x512x512x64", "2x4x128x256x32c", "1x1x8x8x8c"]


def test_isa_list_parses_and_deduplicates():
    assert parse("--isa", "scalar, AVX2,scalar").isa == ["scalar", "avx2"]
    assert parse().isa == []


@pytest.mark.parametrize("args", [
    ["--shapes", "1x8x512x64"],  # four dims
    ["--shapes", "1x8x512x512x64q"],  # unknown suffix
    ["--shapes", "0x8x512x512x64"],  # empty dimension
    ["--shapes", "1x8x512x256x64c"],  # causal with lq > lk leaves rows with no key
    ["--threads", "0"],
    ["--threads", "two"],
    ["--isa", "sse2"],
    ["--dtype", "float16"],
    ["--quick", "--shapes", "1x1x16x16x8"],
    ["--quick", "--memory"],
    ["--memory", "--plot", "x.png"],
    ["--memory", "--isa", "scalar"],
], ids=lambda a: " ".join(a))
def test_bad_arguments_exit_2(args, capsys, monkeypatch):
    # A usage error must be reported before anything is measured.
    monkeypatch.setattr(_bench, "measure_machine", lambda threads: pytest.fail("measured despite a usage error"))
    assert cli.main(["bench", *args]) == 2
    assert "error:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------

def test_json_structure(tmp_path, capsys):
    code, doc = run_json(tmp_path, *TINY, "--isa", ",".join(_bench.ISAS))
    assert code == 0
    assert {"created", "backend_info", "threads", "roofline", "rows", "memory", "isas", "flops_formula",
            "utilisation_formula", "torch_version", "torch_skipped"} <= doc.keys()
    assert doc["threads"] == 1 and doc["memory"] is None  # --shapes runs no memory check

    roofline = doc["roofline"]
    assert roofline["threads"] == 1 and roofline["memory_bound_max_lq"] == _bench.MEMORY_BOUND_MAX_LQ
    if _backend._core is not None:
        assert roofline["fp32_peak_gflops"] > 0 and roofline["read_bandwidth_gbs"] > 0
        assert roofline["fp64_peak_gflops"] == pytest.approx(roofline["fp32_peak_gflops"] / 2)

    isas = doc["isas"]
    assert isas["requested"] == list(_bench.ISAS)
    assert sorted(isas["run"] + list(isas["skipped"])) == sorted(_bench.ISAS)

    (row,) = doc["rows"]
    assert row["shape"] == "1x1x16x16x8" and row["dtype"] == "float32" and row["threads"] == 1
    assert row["bound"] == "memory" and row["mismatch"] is False  # 16 query rows: a decode-sized problem
    assert row["check"]["fusedattn"]["ok"] is True
    expected = {"fusedattn", "naive"} | {_bench.fused_variant(isa) for isa in isas["run"]}
    if doc["torch_version"] is not None:
        expected.add("torch")
    if doc["onnxruntime_version"] is not None:
        expected.add("onnxruntime")
        assert row["check"]["onnxruntime"]["ok"] is True and row["speedup_vs_onnxruntime"] > 0
    else:
        assert "onnx" in doc["onnxruntime_skipped"]
    assert set(row["results"]) == expected
    assert row["cache_resident"] is True and isinstance(row["noisy"], list)  # 16 KB of K and V
    fused = row["results"]["fusedattn"]
    assert {"ms", "gflops", "reps", "inner", "pct_of_peak", "pct_of_bandwidth"} <= fused.keys()
    for isa in isas["run"]:
        forced = row["results"][_bench.fused_variant(isa)]
        assert forced["isa"] == isa and forced["speed_vs_default"] > 0
        assert row["check"][_bench.fused_variant(isa)]["ok"] is True

    out, err = capsys.readouterr()
    assert "[1/1] 1x1x16x16x8 float32" in err  # stderr is not a terminal here: one line per shape
    assert "efficiency" in out and "GFLOP/s" in out


@needs_extension
def test_rows_judged_by_bandwidth_or_by_peak(tmp_path, no_torch):
    limit = _bench.MEMORY_BOUND_MAX_LQ
    code, doc = run_json(tmp_path, "--shapes", f"1x2x1x256x16,1x2x{limit + 1}x64x16", "--threads", "1")
    assert code == 0
    decode, prefill = doc["rows"]
    assert decode["bound"] == "memory" and prefill["bound"] == "compute"
    assert decode["bytes_moved"] == (2 * 1 + 2 * 256) * 2 * 16 * 4
    assert decode["results"]["fusedattn"]["pct_of_bandwidth"] > 0
    assert prefill["results"]["fusedattn"]["pct_of_peak"] > 0
    assert "pct_of_bandwidth" not in prefill["results"]["fusedattn"]


def test_reference_fallback_reports_na(tmp_path, capsys, monkeypatch, no_torch):
    monkeypatch.setattr(_backend, "_core", None)
    code, doc = run_json(tmp_path, *TINY, "--isa", "avx2")
    assert code == 0
    assert doc["roofline"]["fp32_peak_gflops"] is None and doc["roofline"]["unavailable"]
    assert doc["rows"][0]["results"]["fusedattn"]["pct_of_peak"] is None
    assert doc["isas"]["run"] == [] and "avx2" in doc["isas"]["skipped"]
    assert "n/a" in capsys.readouterr().out


def test_mismatch_exits_1(tmp_path, capsys, monkeypatch, no_torch):
    real_attention = fusedattn.attention
    monkeypatch.setattr(fusedattn, "attention", lambda *args, **kwargs: real_attention(*args, **kwargs) + 0.5)
    code, doc = run_json(tmp_path, *TINY)
    assert code == 1
    (row,) = doc["rows"]
    assert row["mismatch"] is True and row["check"]["fusedattn"]["ok"] is False
    assert "MISMATCH" in capsys.readouterr().out


def test_plot_writes_png(tmp_path, no_torch):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (pip install 'fusedattn[plot]')")
    path = tmp_path / "bench.png"
    assert cli.main(["bench", "--shapes", "1x1x16x16x8,1x2x1x64x8", "--threads", "1", "--isa", "scalar",
                     "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_exits_2_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    monkeypatch.setattr(_bench, "measure_machine", lambda threads: pytest.fail("measured without matplotlib"))
    assert cli.main(["bench", *TINY, "--plot", str(tmp_path / "bench.png")]) == 2
    assert "fusedattn[plot]" in capsys.readouterr().err
    assert not (tmp_path / "bench.png").exists()


@needs_extension
def test_memory_check(tmp_path, capsys, monkeypatch):
    # The real 1x8x16384x16384x64 case takes seconds; the mechanics are the same on a small one.
    monkeypatch.setattr(_bench, "MEMORY_CASE", _bench.Case(_bench.Shape(1, 2, 256, 256, 16), np.dtype(np.float32)))
    code, doc = run_json(tmp_path, "--memory", "--threads", "1")
    assert code == 0
    memory = doc["memory"]
    assert memory["shape"] == "1x2x256x256x16" and memory["ok"] is True
    assert memory["out_bytes"] == 2 * 256 * 16 * 4
    assert memory["extra_bytes"] == memory["rss_peak_bytes"] - memory["rss_baseline_bytes"] - memory["out_bytes"]
    assert memory["naive_score_bytes"] == 2 * 256 * 256 * 4
    assert doc["rows"] == []
    assert "beyond its inputs and output" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# The table: width, noisy rows, cache-resident decode rows, the onnxruntime peer
# --------------------------------------------------------------------------------------------

def test_table_fits_80_columns(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, doc = run_json(tmp_path, "--shapes", "1x2x16x16x8,1x2x1x64x8,1x2x32x32x8c", "--threads", "1",
                         "--isa", "avx2")
    assert code == 0
    out = capsys.readouterr().out
    table = out[out.index("shape "):].splitlines()
    assert all(len(line) <= 80 for line in table), "\n".join(line for line in table if len(line) > 80)
    header = table[0].split()
    assert header[:4] == ["shape", "dtype", "fused", "ms"] and header[-1] == "check"
    if doc["onnxruntime_version"] is not None:
        assert "onnxrt" in header  # the peer's ratio is never the column left out
    wide = doc["rows"][0]["results"]
    assert "naive" in wide and "ms" in wide["naive"]  # what the table leaves out, the JSON keeps


def test_wide_terminal_keeps_every_column(tmp_path, capsys, monkeypatch, no_torch):
    monkeypatch.setenv("COLUMNS", "250")
    assert cli.main(["bench", *TINY]) == 0
    out = capsys.readouterr().out
    assert "naive ms" in out and "GFLOP/s" in out and "efficiency" in out and "left out to fit" not in out


def test_fit_table_drops_by_priority():
    columns = [("shape", 0), ("a", 2), ("b", 1), ("c", 2), ("check", 0)]
    rows = [["x" * 10, "1" * 10, "2" * 10, "3" * 10, "ok"]]
    names, cells, dropped = cli._fit_table(columns, rows, 40)
    assert names == ["shape", "b", "check"] and dropped == ["c", "a"] and cells == [["x" * 10, "2" * 10, "ok"]]
    assert cli._fit_table(columns, rows, 200)[2] == []


def test_noisy_timings():
    quiet = _bench.Timing(1.0, 10, 1, median_s=1.1, worst_s=2.5)  # one preempted rep: not noisy
    assert not _bench.is_noisy(quiet)
    assert _bench.is_noisy(_bench.Timing(1.0, 10, 1, median_s=1.5, worst_s=2.0))
    assert _bench.is_noisy(_bench.Timing(1.0, 2, 1, median_s=50.5, worst_s=100.0))  # a time 100x off
    assert not _bench.is_noisy(_bench.Timing(1.0, 1, 1, median_s=1.0, worst_s=1.0))
    timing = _bench.time_best(lambda: None, reps=5, inner=1)
    assert timing.best_s <= timing.median_s <= timing.worst_s


def test_noisy_row_is_flagged(tmp_path, capsys, monkeypatch, no_torch):
    noisy = _bench.Timing(1e-3, 5, 1, median_s=5e-3, worst_s=9e-3)
    monkeypatch.setattr(_bench, "time_best", lambda fn, **kwargs: (fn(), noisy)[1])
    code, doc = run_json(tmp_path, *TINY)
    assert code == 0  # flagged, not failed: the numbers are still the best estimate
    (row,) = doc["rows"]
    assert set(row["noisy"]) == {"fusedattn", "naive"} and row["results"]["fusedattn"]["noisy"] is True
    out = capsys.readouterr().out
    assert "ok NOISY" in out and "NOISY: 1x1x16x16x8 float32" in out


def test_decode_rows_sized_past_the_cache():
    llc = 32 << 20
    decode = _bench.Case(_bench.Shape(1, 32, 1, 1024, 128), np.dtype(np.float32))  # 32 MiB of K + V
    grown = _bench.beyond_cache(decode, llc)
    assert grown.shape.lk == 4096 and _bench.kv_bytes(grown.shape, np.float32) == 4 * llc
    assert not _bench.cache_resident(grown.shape, np.float32, llc)
    assert _bench.cache_resident(decode.shape, np.float32, llc)
    prefill = _bench.Case(_bench.Shape(1, 8, 512, 512, 64), np.dtype(np.float32))
    assert _bench.beyond_cache(prefill, llc) == prefill and not _bench.cache_resident(prefill.shape, np.float32, llc)
    assert _bench.beyond_cache(decode, None) == decode  # unknown cache: as given
    assert _bench.beyond_cache(decode, 1 << 40, limit=1 << 30).shape.lk == 1 << 15  # capped
    quick = _bench.cases_from(None, None, quick=True, llc_bytes=1 << 30)
    assert max(c.shape.lk for c in quick if _bench.is_memory_bound(c.shape)) > 4096


def test_cache_resident_row_says_so(tmp_path, capsys, no_torch):
    code, doc = run_json(tmp_path, "--shapes", "1x2x1x64x8", "--threads", "1")
    assert code == 0
    (row,) = doc["rows"]
    if doc["roofline"]["llc_bytes"] is None:
        pytest.skip("the last-level cache size is unknown here")
    assert row["cache_resident"] is True
    out = capsys.readouterr().out
    assert "in cache" in out and "% bw" not in out


def test_onnxruntime_peer():
    ort, reason = _bench.load_onnxruntime()
    if ort is None:
        pytest.skip(reason)
    shape = _bench.Shape(2, 3, 20, 20, 16, causal=True)
    q, k, v = _bench.make_inputs(shape, np.float32)
    got = _bench.make_runner("onnxruntime", q, k, v, causal=True, threads=1)()
    np.testing.assert_allclose(got, _bench.naive_attention(q, k, v, causal=True), atol=1e-5)
    case64 = _bench.Case(shape, np.dtype(np.float64))
    assert "float32" in _bench.unsupported("onnxruntime", case64)
    decode = _bench.Case(_bench.Shape(1, 2, 1, 30, 8, causal=True), np.dtype(np.float32))
    assert "bottom-right" in _bench.unsupported("onnxruntime", decode)
    assert _bench.unsupported("fusedattn", decode) is None


def test_onnxruntime_skipped_for_float64(tmp_path, monkeypatch):
    if _bench.load_onnxruntime()[0] is None:
        pytest.skip("onnxruntime is not installed")
    monkeypatch.setattr(_bench, "load_torch", lambda: (None, "left out by the test"))
    code, doc = run_json(tmp_path, *TINY, "--dtype", "float64")
    assert code == 0
    (row,) = doc["rows"]
    assert "float32" in row["results"]["onnxruntime"]["skipped"] and "onnxruntime" not in row["check"]
