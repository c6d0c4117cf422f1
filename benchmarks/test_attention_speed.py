"""Speed benchmarks: fusedattn vs naive NumPy vs torch's scaled_dot_product_attention.

The shapes are those of ``fusedattn bench`` (``fusedattn._bench.DEFAULT_CASES``); inputs, baselines,
correctness checks and repetition counts come from ``fusedattn._bench`` too, so both report alike.
They are not part of the default ``pytest`` run (its testpaths is ``tests``). Run them with::

    pytest benchmarks --benchmark-only --benchmark-json=bench.json

``--attn-threads N`` sets the thread count shared by all libraries; ``--benchmark-disable`` turns
each benchmark into a single checked call, a quick smoke test.
"""
import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark: pip install fusedattn[bench]")

from fusedattn import _bench  # noqa: E402  (after the skip: without the plugin there is nothing to run)

# Torch first within each case: fusedattn's ratio to torch needs torch's time already measured.
PARAMS = [pytest.param(case, library, id=f"{case.label}-{library}")
          for case in _bench.DEFAULT_CASES for library in _bench.LIBRARIES]


@pytest.mark.parametrize(("case", "library"), PARAMS)
def test_attention_speed(benchmark, case, library, threads, torch_module, torch_best_s):
    """Time one library on one case; record GFLOP/s, threads, shape and fusedattn's speed-up over torch."""
    torch, torch_reason = torch_module
    shape = case.shape
    if library == "torch" and torch is None:
        pytest.skip(torch_reason)
    if library == "naive" and not _bench.naive_fits(shape, case.dtype):
        gib = _bench.score_bytes(shape, case.dtype) / 2**30
        pytest.skip(f"skipped (memory): the naive score matrix would take {gib:.1f} GiB")

    q, k, v = _bench.make_inputs(shape, case.dtype)
    if library != "naive":  # naive is the yardstick itself
        check = _bench.check_against_naive([library], case, q, k, v, threads=threads, torch=torch)[library]
        assert check.ok is not False, f"{library} disagrees with naive NumPy on {case.label}: {check.status}"
    run = _bench.make_runner(library, q, k, v, causal=shape.causal, threads=threads, torch=torch)

    benchmark.group = case.label
    benchmark.extra_info.update(
        library=library, shape=shape.label, dims=list(shape.dims), dtype=case.dtype.name,
        causal=shape.causal, threads=threads, gflop=_bench.attention_flops(shape) / 1e9,
    )
    if not benchmark.enabled:
        benchmark.pedantic(run)  # --benchmark-disable: a single call, no timing
        return
    # At least 3 rounds even for second-long naive cases; fast ones get as many as fit in ~0.3 s.
    rounds, iterations = _bench.plan_repetitions(run, min_reps=6)
    benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=1)

    best_s = benchmark.stats.stats.min
    benchmark.extra_info["gflops"] = _bench.gflops(shape, best_s)
    if library == "torch":
        torch_best_s[case.label] = best_s
    elif library == "fusedattn" and case.label in torch_best_s:
        benchmark.extra_info["speedup_vs_torch"] = torch_best_s[case.label] / best_s
