"""Speed of forward + backward (a training step's attention): fusedattn vs torch's SDPA with autograd.

fusedattn runs :func:`fusedattn.attention_vjp` and then its backward closure; torch runs
``scaled_dot_product_attention`` on ``requires_grad`` leaves that view the same buffers, then
``out.backward(dout)``. Both get the same thread count (``torch.set_num_threads`` via the session fixture,
``num_threads=`` for fusedattn) and the anchor shapes of ``fusedattn bench`` (the training-sized
``DEFAULT_CASES``: not the decode row, whose single query is no training shape, nor the float64 row),
in float32. Run with::

    PYTHONPATH=... python -m pytest benchmarks/test_backward_speed.py --benchmark-only -q

``extra_info``: ``ms`` (best round), ``gflops`` = ``forward_backward_flops / time`` where
forward + backward counts 7 matrix products, 3.5x the forward's ``4*B*H*Lq*Lk*D`` (halved for causal;
see ``fusedattn._bench.FORWARD_BACKWARD_FLOP_FACTOR``), ``pct_of_peak``, and for fusedattn
``speedup_vs_torch`` = torch's best time / fusedattn's, both measured in this session (torch first per
shape). Before timing, fusedattn's gradients are checked against torch's.
"""
import numpy as np
import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark: pip install fusedattn[bench]")

from fusedattn import _bench  # noqa: E402  (after the skip: without the plugin there is nothing to run)

_F32 = np.dtype(np.float32)
CASES = [case for case in _bench.DEFAULT_CASES
         if case.dtype == _F32 and not _bench.is_memory_bound(case.shape)]
LIBRARIES = ("torch", "fusedattn")  # torch first: fusedattn's ratio needs its time

# Gradients are sums over up to 2048 rows in float32 with different orders on the two sides: measured
# differences ~1e-6 of max|grad|; 1e-4 (like _bench.TOLERANCES) still catches any wrong mask or term.
GRAD_CHECK_TOL = 1e-4

PARAMS = [pytest.param(case, library, id=f"{case.label}-{library}") for case in CASES for library in LIBRARIES]


def _relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1.0))


@pytest.mark.parametrize(("case", "library"), PARAMS)
def test_forward_backward_speed(benchmark, case, library, threads, torch_module, machine, best_s):
    """Time one forward + backward pass of one library on one case; record ms, GFLOP/s and the ratio to torch."""
    torch, torch_reason = torch_module
    shape = case.shape
    if library == "torch" and torch is None:
        pytest.skip(torch_reason)

    q, k, v = _bench.make_inputs(shape, case.dtype)
    dout = np.random.default_rng(1).standard_normal(q.shape[:-1] + (v.shape[-1],), dtype=case.dtype)
    run = _bench.make_backward_runner(library, q, k, v, dout, causal=shape.causal, threads=threads, torch=torch)
    if library == "fusedattn" and torch is not None:
        want = _bench.make_backward_runner("torch", q, k, v, dout, causal=shape.causal, threads=threads, torch=torch)()
        for name, got, expected in zip(("dq", "dk", "dv"), run(), want):
            err = _relative_error(got, expected.numpy())
            assert err <= GRAD_CHECK_TOL, f"{name} differs from torch's on {case.label}: {err:.2e} of max|{name}|"

    key = ("forward+backward", case.label)
    benchmark.group = f"fwd+bwd {case.label}"
    benchmark.extra_info.update(
        library=library, shape=shape.label, dims=list(shape.dims), dtype=case.dtype.name, causal=shape.causal,
        threads=threads, gflop=_bench.forward_backward_flops(shape) / 1e9, fp32_peak_gflops=machine.fp32_peak_gflops,
        flop_convention="fwd+bwd = 3.5 x 4*B*H*Lq*Lk*D (7 matmuls), halved if causal",
    )
    seconds = _bench.run_benchmark(benchmark, run, target_s=0.5, min_reps=6)
    if seconds is None:  # --benchmark-disable: one untimed call
        return
    best_s[key, library] = seconds
    gflops = _bench.forward_backward_flops(shape) / seconds / 1e9
    peak = machine.peak_gflops(case.dtype)
    benchmark.extra_info.update(ms=seconds * 1e3, gflops=gflops, pct_of_peak=100 * gflops / peak if peak else None)
    if library == "fusedattn" and (key, "torch") in best_s:
        # Above 1 fusedattn is faster.
        benchmark.extra_info["speedup_vs_torch"] = best_s[key, "torch"] / seconds
