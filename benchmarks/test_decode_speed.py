"""Serving decode (issue #15): one query token per head against K/V beyond the last-level cache.

Rows, every one in the same process and run, fusedattn first then torch 2.13's SDPA on the contiguous
equivalent (float32 K/V for the int8 rows: what torch would read without a quantised cache):

* ``contig-{float32,bfloat16,int8}-g{1,4,8}``: B=1, 8 kv heads x 131072 keys x D=128 (1.07 GB of float32
  K/V, 0.54 GB bfloat16, 0.27 GB int8 + 8 MB of scales), GQA groups of 1, 4 and 8 query heads per kv head.
* ``paged-…-g4``: the same data in a (num_blocks, 16, Hkv, D) pool, blocks shuffled, read through the table.
* ``ragged16-…-g4``: 16 sequences of 4096..16383 keys (a shuffled paged pool), ``attention_paged``.
* ``step-float32-g4-lk{64,1024}``, ``step-int8-g4-lk64``, ``step-paged-{float32,int8}-g4-lk64``,
  ``step-paged-int8-sinks-g4-lk64`` (``test_decode_step``): one decode step against a short cache (32 query
  heads over 8 kv heads, D=128), where the time per call, not the bandwidth, is what a serving loop sees:
  ``us`` and ``speedup_vs_torch`` (torch's tensors made beforehand, as for every row).

``extra_info``: ``ms`` (best round), ``gbs`` (K/V/scale bytes read over the time), ``pct_of_bandwidth``
(of the machine's read bandwidth, measured by ``fusedattn bench``'s probe in the same session) and
``speedup_vs_torch``. Run with::

    python -m pytest benchmarks/test_decode_speed.py --benchmark-only --attn-threads 2 -q
"""
import numpy as np
import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark: pip install fusedattn[bench]")

import fusedattn  # noqa: E402
from fusedattn import _bench  # noqa: E402

HKV, LK, D, BLOCK = 8, 131072, 128, 16
STORAGES = ("float32", "bfloat16", "int8")
GROUPS = (1, 4, 8)
RAGGED = 16


def _float_dtype(storage):
    if storage == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float32)


def _make(storage, lengths, group, *, paged, seed=0):
    """q and the call's K/V arguments; the same float32 data for every storage."""
    rng = np.random.default_rng(seed)
    batch, total = len(lengths), int(sum(lengths))
    k = rng.standard_normal((total, HKV, D), dtype=np.float32)
    v = rng.standard_normal((total, HKV, D), dtype=np.float32)
    q = rng.standard_normal((batch, HKV * group, 1, D), dtype=np.float32).astype(_float_dtype(storage))
    extra = {}
    if storage == "int8":
        (k, k_scale), (v, v_scale) = fusedattn.quantize_kv(k), fusedattn.quantize_kv(v)
    else:
        k, v = k.astype(_float_dtype(storage)), v.astype(_float_dtype(storage))
    if not paged:  # B = 1: (1, Hkv, Lk, D) views of the token-major arrays' transposes, made contiguous
        k, v = (np.ascontiguousarray(x.transpose(1, 0, 2))[None] for x in (k, v))
        if storage == "int8":
            extra = {"k_scale": np.ascontiguousarray(k_scale.T)[None], "v_scale": np.ascontiguousarray(v_scale.T)[None]}
        return q, (k, v), extra
    blocks = [-(-n // BLOCK) for n in lengths]
    pool = int(sum(blocks))
    order = rng.permutation(pool)  # each sequence's blocks anywhere in the pool
    table = np.zeros((batch, max(blocks)), np.int32)
    kc = np.zeros((pool, BLOCK, HKV, D), k.dtype)
    vc = np.zeros_like(kc)
    ks, vs = np.zeros((pool, BLOCK, HKV), np.float32), np.zeros((pool, BLOCK, HKV), np.float32)
    start, used = 0, 0
    for b, n in enumerate(lengths):
        ids = order[used:used + blocks[b]]
        table[b, :blocks[b]] = ids
        for j, block in enumerate(ids):
            rows = slice(start + j * BLOCK, min(start + (j + 1) * BLOCK, start + n))
            m = rows.stop - rows.start
            kc[block, :m], vc[block, :m] = k[rows], v[rows]
            if storage == "int8":
                ks[block, :m], vs[block, :m] = k_scale[rows], v_scale[rows]
        start, used = start + n, used + blocks[b]
    if storage == "int8":
        extra = {"k_scale": ks, "v_scale": vs}
    return q, (kc, vc, table, np.asarray(lengths, np.int32)), extra


def _bytes_read(storage, lengths):
    item = {"float32": 4, "bfloat16": 2, "int8": 1}[storage]
    per_token = 2 * HKV * D * item + (2 * HKV * 4 if storage == "int8" else 0)
    return int(sum(lengths)) * per_token


CASES = ([("contig", s, g) for s in STORAGES for g in GROUPS] + [("paged", s, 4) for s in STORAGES]
         + [("ragged16", s, 4) for s in STORAGES])


@pytest.mark.parametrize(("layout", "storage", "group"),
                         [pytest.param(*c, id=f"{c[0]}-{c[1]}-g{c[2]}") for c in CASES])
def test_decode_speed(benchmark, layout, storage, group, threads, torch_module, machine):
    if storage == "bfloat16":
        pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes")
    lengths = ([LK] if layout != "ragged16" else
               np.random.default_rng(5).integers(4096, 16384, RAGGED).tolist())
    q, kv, extra = _make(storage, lengths, group, paged=layout != "contig")
    if layout == "contig":
        run = lambda: fusedattn.attention(q, *kv, num_threads=threads, **extra)  # noqa: E731
    else:
        run = lambda: fusedattn.attention_paged(q, *kv, num_threads=threads, **extra)  # noqa: E731
    best = _bench.run_benchmark(benchmark, run, target_s=1.0, min_reps=5)
    if best is None:
        return
    gbs = _bytes_read(storage, lengths) / best / 1e9
    info = {"ms": best * 1e3, "gbs": gbs, "bandwidth_gbs": machine.read_bandwidth_gbs,
            "pct_of_bandwidth": 100 * gbs / machine.read_bandwidth_gbs if machine.read_bandwidth_gbs else None}
    torch, reason = torch_module
    if torch is not None:
        info["speedup_vs_torch"] = _torch_time(torch, storage, group, lengths) / best
    benchmark.extra_info.update(info)


_TORCH_TIMES = {}


def _torch_time(torch, storage, group, lengths):
    """torch SDPA's best time on the contiguous equivalent (float32 for int8: torch has no int8 cache); ragged
    batches as a torch user runs them, one SDPA call per sequence."""
    key = (storage, group, tuple(lengths))
    if key not in _TORCH_TIMES:
        rng = np.random.default_rng(0)
        dtype = torch.bfloat16 if storage == "bfloat16" else torch.float32
        seqs = []
        for n in lengths:
            k, v = (torch.from_numpy(rng.standard_normal((1, HKV, n, D), dtype=np.float32)).to(dtype) for _ in "kv")
            q = torch.from_numpy(rng.standard_normal((1, HKV * group, 1, D), dtype=np.float32)).to(dtype)
            seqs.append((q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def run():
            with torch.inference_mode():
                return [sdpa(q, k, v, enable_gqa=group > 1) for q, k, v in seqs]

        _TORCH_TIMES[key] = _bench.time_best(run, target_s=1.0, min_reps=5).best_s
        del seqs
    return _TORCH_TIMES[key]


STEP_LENGTHS = (64, 1024)


STEP_CASES = ([("contig", "float32", n, False) for n in STEP_LENGTHS] + [("contig", "int8", STEP_LENGTHS[0], False)]
              + [("paged", s, STEP_LENGTHS[0], False) for s in ("float32", "int8")]
              + [("paged", "int8", STEP_LENGTHS[0], True)])


def _step_id(layout, storage, length, sinks):
    return f"step-{'paged-' if layout == 'paged' else ''}{storage}{'-sinks' if sinks else ''}-g4-lk{length}"


@pytest.mark.parametrize(("layout", "storage", "length", "sinks"),
                         [pytest.param(*c, id=_step_id(*c)) for c in STEP_CASES])
def test_decode_step(benchmark, layout, storage, length, sinks, threads, torch_module):
    """One token's attention against a short cache, called as a decode loop calls it (same shapes and
    options every step): the per-call cost of validation and dispatch shows here, not in the rows above.
    int8: the cache quantised, with its scales; paged: ``attention_paged`` on a pool of 16-token blocks;
    sinks: gpt-oss's per-head sink logits passed every step (torch: SDPA on the contiguous float32
    equivalent, without sinks, every row)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, HKV * 4, 1, D), dtype=np.float32)
    k, v = (rng.standard_normal((1, HKV, length, D), dtype=np.float32) for _ in "kv")
    options = {"sinks": rng.standard_normal(HKV * 4).astype(np.float32)} if sinks else {}
    if layout == "paged":
        paged_q, pool, scales = _make(storage, [length], 4, paged=True)
        run = lambda: fusedattn.attention_paged(paged_q, *pool, num_threads=threads, **scales, **options)  # noqa: E731
    else:
        kv, scales = (k, v), {}
        if storage == "int8":
            (k8, k_scale), (v8, v_scale) = fusedattn.quantize_kv(k), fusedattn.quantize_kv(v)
            kv, scales = (k8, v8), {"k_scale": k_scale, "v_scale": v_scale}
        run = lambda: fusedattn.attention(  # noqa: E731
            q, *kv, causal="bottom_right", num_threads=threads, **scales, **options)
    best = _bench.run_benchmark(benchmark, run, target_s=0.5, min_reps=200)
    if best is None:
        return
    info = {"us": best * 1e6}
    torch, reason = torch_module
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def run_torch():
            with torch.inference_mode():
                return sdpa(tq, tk, tv, enable_gqa=True)

        info["speedup_vs_torch"] = _bench.time_best(run_torch, target_s=0.5, min_reps=200).best_s / best
    benchmark.extra_info.update(info)
