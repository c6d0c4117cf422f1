"""Speed benchmarks: fusedattn vs naive NumPy vs torch's scaled_dot_product_attention.

The shapes are those of ``fusedattn bench`` (``fusedattn._bench.DEFAULT_CASES``); inputs, baselines,
correctness checks, repetition counts and the machine's peak come from ``fusedattn._bench`` too, so
both report alike. fusedattn also runs forced onto its AVX2 path (every case) and its scalar path
(the cheapest cases only: it is ~10x slower), as ``fusedattn[avx2]`` and ``fusedattn[scalar]``.
They are not part of the default ``pytest`` run (its testpaths is ``tests``). Run them with::

    pytest benchmarks --benchmark-only --benchmark-json=bench.json

``extra_info`` holds GFLOP/s, threads, ``pct_of_peak`` (and ``pct_of_bandwidth`` for decode shapes),
fusedattn's ``speedup_vs_torch`` and each forced path's ``speed_vs_default``. ``--attn-threads N``
sets the thread count shared by all libraries; ``--benchmark-disable`` turns each benchmark into a
single checked call, a quick smoke test.
"""
import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark: pip install fusedattn[bench]")

from fusedattn import _bench  # noqa: E402  (after the skip: without the plugin there is nothing to run)

# The scalar path on the 2048-token shapes would take minutes per benchmark; these few GFLOP suffice
# to know its cost.
SCALAR_MAX_GFLOP = 1.1


def _libraries(case):
    libraries = list(_bench.LIBRARIES) + [_bench.fused_variant("avx2")]
    if _bench.attention_flops(case.shape) <= SCALAR_MAX_GFLOP * 1e9:
        libraries.append(_bench.fused_variant("scalar"))
    return libraries


# Torch first within each case, the forced paths after fusedattn: their ratios need those times.
PARAMS = [pytest.param(case, library, id=f"{case.label}-{library}")
          for case in _bench.DEFAULT_CASES for library in _libraries(case)]


@pytest.mark.parametrize(("case", "library"), PARAMS)
def test_attention_speed(benchmark, case, library, threads, torch_module, machine, best_s):
    """Time one library on one case; record GFLOP/s, threads, % of peak and the ratios to torch / default."""
    torch, torch_reason = torch_module
    shape = case.shape
    isa = _bench.library_isa(library)
    if library == "torch" and torch is None:
        pytest.skip(torch_reason)
    if isa is not None and _bench.isa_unavailable(isa):
        pytest.skip(f"ISA {isa}: {_bench.isa_unavailable(isa)}")
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
        library=library, isa=isa, shape=shape.label, dims=list(shape.dims), dtype=case.dtype.name,
        causal=shape.causal, threads=threads, gflop=_bench.attention_flops(shape) / 1e9,
        fp32_peak_gflops=machine.fp32_peak_gflops, read_bandwidth_gbs=machine.read_bandwidth_gbs,
    )
    with _bench.isa_for(library):
        # At least 3 rounds even for second-long naive cases (the scalar path: 1), fast ones as many as fit
        # in ~0.3 s.
        seconds = _bench.run_benchmark(benchmark, run, **_bench.timing_budget(library, min_reps=6))
    if seconds is None:  # --benchmark-disable: one untimed call
        return
    best_s[case.label, library] = seconds
    benchmark.extra_info["gflops"] = _bench.gflops(shape, seconds)
    benchmark.extra_info.update(_bench.utilisation(shape, case.dtype, seconds, machine))
    if library == "fusedattn" and (case.label, "torch") in best_s:
        benchmark.extra_info["speedup_vs_torch"] = best_s[case.label, "torch"] / seconds
    if isa is not None and (case.label, "fusedattn") in best_s:
        # Above 1 the forced path is faster than the selected one, below 1 slower.
        benchmark.extra_info["speed_vs_default"] = best_s[case.label, "fusedattn"] / seconds
