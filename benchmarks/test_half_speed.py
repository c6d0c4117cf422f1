"""Speed of 16-bit attention (issue 6): fusedattn vs torch's scaled_dot_product_attention in the same dtype.

bfloat16 (``ml_dtypes``) and float16 inputs on the two anchor prefill shapes of ``fusedattn bench``
(1x8x2048x2048 with D = 64 and D = 128) and its single-token decode shape (1x32x1x8192x128). fusedattn reads
16-bit storage and accumulates in float32 (16-bit output); on the ``avx512bf16`` ISA level (the default
where the CPU has AVX512-BF16) bfloat16 prefill uses native ``vdpbf16ps`` products, elsewhere the inputs
are widened to float32 in the kernel. torch runs its CPU SDPA on 16-bit tensors holding the same values. Both get the same thread count (``--attn-threads N``, default
``fusedattn.get_num_threads()``; torch is pinned by the session fixture, fusedattn takes ``num_threads=``).
Run with::

    PYTHONPATH=... python -m pytest benchmarks/test_half_speed.py --benchmark-only --attn-threads 2 -q

``extra_info``: ``isa`` (fusedattn's ISA path), ``ms`` (best round), ``gflops`` (``4*B*H*Lq*Lk*D / time``, the convention of
``fusedattn._bench.attention_flops``), ``gbs`` for the decode shape (bytes of q, k, v and out in 16 bits
over the time: decode is memory-bound), and for fusedattn ``speedup_vs_torch`` = torch's best time /
fusedattn's in the same session (torch runs first on each shape and dtype; above 1 fusedattn is faster).
Before timing, fusedattn's output is checked against torch's.
"""
import numpy as np
import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark: pip install fusedattn[bench]")
ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes: pip install ml_dtypes")

import fusedattn  # noqa: E402  (after the skips: without the plugin there is nothing to run)
from fusedattn import _bench  # noqa: E402

SHAPES = (_bench.Shape(1, 8, 2048, 2048, 64), _bench.Shape(1, 8, 2048, 2048, 128), _bench.Shape(1, 32, 1, 8192, 128))
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
LIBRARIES = ("torch", "fusedattn")  # torch first: fusedattn's ratio needs its time

# Both outputs are within about one 16-bit rounding of the exact result (fusedattn: float32 accumulation
# rounded once; torch also rounds its probabilities to 16 bits), so they differ by a few eps16 relative
# to max|out|; 8 eps16 (bfloat16: 0.06, float16: 0.008) still fails any wrong key, mask or scale.
CHECK_EPS = 8

PARAMS = [pytest.param(shape, name, library, id=f"{shape.label}-{name}-{library}")
          for shape in SHAPES for name in DTYPES for library in LIBRARIES]


def _inputs(shape, dtype):
    # Drawn in float32 (standard normal, scores O(1) with the default scale) and rounded once to 16 bits.
    return tuple(x.astype(dtype) for x in _bench.make_inputs(shape, np.float32))


def _runner(library, torch, q, k, v, dtype_name, threads):
    if library == "fusedattn":
        return lambda: fusedattn.attention(q, k, v, num_threads=threads)
    # torch cannot import ml_dtypes arrays: through float32, which holds every 16-bit value exactly.
    tq, tk, tv = (torch.from_numpy(x.astype(np.float32)).to(getattr(torch, dtype_name)) for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run():
        with torch.inference_mode():
            return sdpa(tq, tk, tv)

    return run


@pytest.mark.parametrize(("shape", "dtype_name", "library"), PARAMS)
def test_half_speed(benchmark, shape, dtype_name, library, threads, torch_module, best_s):
    """Time one library on one shape in one 16-bit dtype; record ms, GFLOP/s and the ratio to torch."""
    torch, torch_reason = torch_module
    if library == "torch" and torch is None:
        pytest.skip(torch_reason)
    dtype = DTYPES[dtype_name]
    q, k, v = _inputs(shape, dtype)
    run = _runner(library, torch, q, k, v, dtype_name, threads)
    if library == "fusedattn" and torch is not None:
        ours = run().astype(np.float64)
        theirs = _runner("torch", torch, q, k, v, dtype_name, threads)().float().numpy()
        err = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
        limit = CHECK_EPS * float(ml_dtypes.finfo(dtype).eps)
        assert err <= limit, f"fusedattn differs from torch on {shape.label} {dtype_name}: {err:.2e} > {limit:.2e}"

    key = (shape.label, dtype_name)
    benchmark.group = f"{shape.label}-{dtype_name}"
    benchmark.extra_info.update(library=library, shape=shape.label, dims=list(shape.dims), dtype=dtype_name,
                                threads=threads, gflop=_bench.attention_flops(shape) / 1e9)
    if library == "fusedattn":
        benchmark.extra_info["isa"] = fusedattn.backend_info()["isa"]
    seconds = _bench.run_benchmark(benchmark, run, target_s=0.5, min_reps=6)
    if seconds is None:  # --benchmark-disable: one untimed call
        return
    best_s[key, library] = seconds
    benchmark.extra_info.update(ms=seconds * 1e3, gflops=_bench.gflops(shape, seconds))
    if _bench.is_memory_bound(shape):
        benchmark.extra_info["gbs"] = _bench.bytes_moved(shape, dtype) / seconds / 1e9
    if library == "fusedattn" and (key, "torch") in best_s:
        benchmark.extra_info["speedup_vs_torch"] = best_s[key, "torch"] / seconds
