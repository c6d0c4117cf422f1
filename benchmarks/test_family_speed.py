"""Speed of the rest of the family: additive attention vs NumPy, and a KV-cache decode step vs torch.

* ``additive``: :func:`fusedattn.additive_attention` vs :func:`fusedattn._bench.naive_additive_attention`,
  NumPy's ``softmax(sum_d w_d tanh(q[:, None] + k[None])) @ v`` chunked over query rows (NumPy is first
  per shape: fusedattn's ratio needs its time). NumPy's BLAS is pinned to the same thread count, but its
  tanh and elementwise ops run on one thread whatever the setting: the ratio is against NumPy as it is.
* ``decode``: one new query token per head against a 4096-token :class:`fusedattn.kv_cache.KVCache`
  (head_dim 128, 32 query heads over 8 kv heads (GQA) or 32 (MHA)), ``KVCache.attend`` vs torch's SDPA
  on tensors made by ``torch.from_numpy`` of the same cache buffers (``enable_gqa=True`` for GQA; torch
  first). The cache is exactly full, so its prefix is contiguous and neither side pays for strides.
  Every round re-reads the same cache, as a decode loop does: K/V that fit in the last-level cache
  (32 MiB for GQA, 128 MiB for MHA) stay partly warm, so ``gbs`` can exceed the DRAM read bandwidth.

Run with::

    PYTHONPATH=... python -m pytest benchmarks/test_family_speed.py --benchmark-only -q

``extra_info``: ``ms`` (best round), ``speedup_vs_numpy`` / ``speedup_vs_torch`` (the baseline's best
time over fusedattn's, above 1 = fusedattn faster), and for decode ``gbs`` (the K/V/q/out bytes over the
time) and ``pct_of_bandwidth`` of the machine's measured read bandwidth.
"""
import math

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark: pip install fusedattn[bench]")

import fusedattn  # noqa: E402
from fusedattn import _bench  # noqa: E402
from fusedattn.kv_cache import KVCache  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Additive attention vs NumPy
# ---------------------------------------------------------------------------------------------

ADDITIVE_SHAPES = (_bench.Shape(1, 4, 256, 256, 64), _bench.Shape(1, 8, 512, 512, 64))
ADDITIVE_LIBRARIES = ("numpy", "fusedattn")

# Scores are sums of D = 64 tanh terms: float32 rounding of ~eps * sum|w_d| per score (tanh is accurate to
# ~1 ulp of 1 on both sides), which the softmax passes on to the outputs; measured ~1e-6, and a wrong
# weight or key moves outputs by >= 1e-2.
ADDITIVE_CHECK_TOL = 1e-4


@pytest.mark.parametrize(("shape", "library"),
                         [pytest.param(s, lib, id=f"additive-{s.label}-{lib}")
                          for s in ADDITIVE_SHAPES for lib in ADDITIVE_LIBRARIES])
def test_additive_speed(benchmark, shape, library, threads, best_s):
    q, k, v = _bench.make_inputs(shape, np.float32)
    # Standard-normal q and k put q + k in tanh's sensitive range; a weight of O(1/sqrt(D)) keeps the
    # scores O(1) (as the default 1/sqrt(D) scale does for dot products), so the softmax is not one-hot.
    w = (np.random.default_rng(2).standard_normal(shape.d) / math.sqrt(shape.d)).astype(np.float32)
    if library == "fusedattn":
        run = lambda: fusedattn.additive_attention(q, k, v, score_weight=w, num_threads=threads)  # noqa: E731
        want = _bench.naive_additive_attention(q, k, v, w)
        np.testing.assert_allclose(run(), want, rtol=ADDITIVE_CHECK_TOL, atol=ADDITIVE_CHECK_TOL)
    else:
        run = lambda: _bench.naive_additive_attention(q, k, v, w)  # noqa: E731

    key = ("additive", shape.label)
    benchmark.group = f"additive {shape.label}"
    b, h, lq, lk, d = shape.dims
    benchmark.extra_info.update(library=library, shape=shape.label, dims=list(shape.dims), dtype="float32",
                                threads=threads, tanh_evaluations=b * h * lq * lk * d)
    seconds = _bench.run_benchmark(benchmark, run, target_s=0.5, min_reps=6)
    if seconds is None:  # --benchmark-disable: one untimed call
        return
    best_s[key, library] = seconds
    benchmark.extra_info["ms"] = seconds * 1e3
    if library == "fusedattn" and (key, "numpy") in best_s:
        benchmark.extra_info["speedup_vs_numpy"] = best_s[key, "numpy"] / seconds


# ---------------------------------------------------------------------------------------------
# One decode step on a KV cache vs torch
# ---------------------------------------------------------------------------------------------

CACHE_LEN, HEAD_DIM, Q_HEADS = 4096, 128, 32
DECODE_KV_HEADS = {"gqa32x8": 8, "mha32x32": 32}
DECODE_LIBRARIES = ("torch", "fusedattn")

# One query over 4096 keys in float32, both sides; measured ~1e-7. Same bound as _bench.TOLERANCES.
DECODE_CHECK_TOL = _bench.TOLERANCES[np.dtype(np.float32)]


@pytest.fixture
def fusedattn_threads(threads):
    """KVCache.attend takes no num_threads=: hold fusedattn's default at ``threads`` for the benchmark."""
    previous = fusedattn.get_num_threads()
    fusedattn.set_num_threads(threads)
    try:
        yield threads
    finally:
        fusedattn.set_num_threads(previous)


def _filled_cache(num_kv_heads):
    cache = KVCache(1, num_kv_heads, max_len=CACHE_LEN, head_dim=HEAD_DIM, dtype=np.float32)
    rng = np.random.default_rng(3)
    shape = (1, num_kv_heads, CACHE_LEN, HEAD_DIM)
    cache.append(rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32))
    q = rng.standard_normal((1, Q_HEADS, 1, HEAD_DIM), dtype=np.float32)
    return cache, q


def _torch_decode(torch, cache, q):
    # The cache's own buffers (key_buffer / value_buffer are writeable; the read-only .keys views would
    # make torch warn), sliced to the filled prefix on the torch side: no copy.
    n = cache.length
    tk = torch.from_numpy(cache.key_buffer)[:, :, :n]
    tv = torch.from_numpy(cache.value_buffer)[:, :, :n]
    tq = torch.from_numpy(q)
    gqa = cache.num_kv_heads != q.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run():
        # inference_mode, as a decoding loop would run; one query sees the whole cache: no causal mask.
        with torch.inference_mode():
            return sdpa(tq, tk, tv, enable_gqa=gqa)

    return run


@pytest.mark.parametrize(("config", "library"),
                         [pytest.param(c, lib, id=f"decode-{c}-{lib}")
                          for c in DECODE_KV_HEADS for lib in DECODE_LIBRARIES])
def test_kv_cache_decode_speed(benchmark, config, library, fusedattn_threads, torch_module, machine, best_s):
    torch, torch_reason = torch_module
    if torch is None and library == "torch":
        pytest.skip(torch_reason)
    cache, q = _filled_cache(DECODE_KV_HEADS[config])
    if library == "fusedattn":
        run = lambda: cache.attend(q)  # noqa: E731
        if torch is not None:
            want = _torch_decode(torch, cache, q)().numpy()
            np.testing.assert_allclose(run(), want, rtol=DECODE_CHECK_TOL, atol=DECODE_CHECK_TOL)
    else:
        run = _torch_decode(torch, cache, q)

    # What one step must move at least: the cached keys and values once, q in and out back.
    step_bytes = (cache.keys.nbytes + cache.values.nbytes + 2 * q.nbytes)
    key = ("decode", config)
    benchmark.group = f"decode {config}"
    benchmark.extra_info.update(library=library, q_heads=Q_HEADS, kv_heads=cache.num_kv_heads, cache_len=CACHE_LEN,
                                head_dim=HEAD_DIM, dtype="float32", threads=fusedattn_threads, bytes=step_bytes)
    seconds = _bench.run_benchmark(benchmark, run, target_s=0.5, min_reps=10)
    if seconds is None:  # --benchmark-disable: one untimed call
        return
    best_s[key, library] = seconds
    gbs = step_bytes / seconds / 1e9
    bandwidth = machine.read_bandwidth_gbs
    benchmark.extra_info.update(ms=seconds * 1e3, gbs=gbs, read_bandwidth_gbs=bandwidth,
                                pct_of_bandwidth=100 * gbs / bandwidth if bandwidth else None)
    if library == "fusedattn" and (key, "torch") in best_s:
        benchmark.extra_info["speedup_vs_torch"] = best_s[key, "torch"] / seconds
