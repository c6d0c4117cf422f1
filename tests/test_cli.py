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
    """Leave torch out: its column is covered by test_json_structure, and each run costs time."""
    monkeypatch.setattr(_bench, "load_torch", lambda: (None, "left out by the test"))


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
    assert set(row["results"]) == expected
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
