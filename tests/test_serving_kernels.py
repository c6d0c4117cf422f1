"""The serving kernels of issue #15 (attention sinks, int8 K / V with per-token scales, paged K / V,
thread-count-independent key splits), through the C++ core on hand-built call specs (no Python validation), against
a float64 NumPy computation written here: pages gathered, int8 dequantised and the sink added in NumPy.

Tolerances (q / out dtype vs the float64 truth on standard-normal data, scaled scores O(1)):
  float32: atol = rtol = 2e-5, the argument of conftest.assert_close (rounding ~ sqrt(n) eps32 over
           D <= 128 products and Lk <= ~1100 keys gives a few 1e-7; int8 adds nothing, the dequantised
           values k_scale * k8 are what the truth uses, and folding the scale into the score or the
           probability rounds once more, at eps32).
  float64: 1e-12 (eps64 in place of eps32).
  float16: out is rounded to float16 (half an ulp is 2^-11 ~ 4.9e-4 relative): atol = rtol = 2e-3.
  bfloat16: out is rounded to bfloat16 (2^-8 ~ 3.9e-3 relative, 2^-9 half an ulp); P may be rounded to
           bfloat16 for P.V on the native bf16 levels (torch does the same): atol = rtol = 1.6e-2.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from types import SimpleNamespace

from fusedattn import _backend
from fusedattn._spec import check_alibi_slopes, positions
from fusedattn.reference import compute_dtype


def _kernel_spec(q, k, v, *, sinks=None, k_scale=None, v_scale=None, block_table=None, seq_lens=None, causal=False,
                 scale=None, window=None, alibi_slopes=None, softcap=None, dropout_p=0.0, seed=0, num_threads=None):
    """A call spec built by hand, with no Python validation: these tests reach the C++ core directly (its
    own invariant checks included), the way a caller that bypasses fusedattn._spec would. The bindings read
    the spec's fields by name, so a namespace with AttentionSpec's field names is one."""
    hq, lq, d = q.shape[-3:]
    paged = block_table is not None
    lk = lq if (paged or seq_lens is not None) else k.shape[-2]  # per-sequence offsets come from seq_lens
    cdt = compute_dtype(q.dtype)
    fields = positions(causal, window, softcap, 0, 0, lq, lk)
    return SimpleNamespace(
        q=q, k=k, v=v, mask=None, score_weight=None, scale=float(1.0 / np.sqrt(d) if scale is None else scale),
        alibi_slopes=check_alibi_slopes(alibi_slopes, q.shape[:-3], hq, q.dtype), dropout_p=float(dropout_p),
        dropout_seed=int(seed), precision="highest", num_threads=num_threads or _backend.default_num_threads(),
        packing=None, sinks=None if sinks is None else np.ascontiguousarray(sinks, dtype=cdt), k_scale=k_scale,
        v_scale=v_scale, block_table=None if block_table is None else np.ascontiguousarray(block_table, np.int32),
        seq_lens=None if seq_lens is None else np.ascontiguousarray(seq_lens, np.int64), **fields)


def _serving_call(q, k, v, *, return_lse=False, **options):
    """The forward kernel on a hand-built spec; q is (B, Hq, Lq, D) (or (..., Hq, Lq, D) when not paged)."""
    spec = _kernel_spec(q, k, v, **options)
    out = np.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    lse = np.empty(q.shape[:-1], dtype=compute_dtype(q.dtype)) if return_lse else None
    _backend._core.attention_forward(spec, out=out, lse=lse)
    return (out, lse) if return_lse else out


def _serving_weights(q, k, *, sinks=None, causal=False, scale=None, num_threads=None):
    """attention_weights(q, k) with sinks: rows sum to less than 1."""
    spec = _kernel_spec(q, k, k, sinks=sinks, causal=causal, scale=scale, num_threads=num_threads)
    weights = np.zeros(q.shape[:-1] + (k.shape[-2],), dtype=q.dtype)
    _backend._core.attention_weights(spec, weights=weights)
    return weights

pytestmark = pytest.mark.skipif(_backend._core is None, reason="needs the compiled extension")

try:
    import ml_dtypes

    BF16 = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
    BF16 = None

TOL = {np.float32: 2e-5, np.float64: 1e-12, np.float16: 2e-3}


def tol_of(dtype):
    return 1.6e-2 if dtype is BF16 else TOL[dtype]


def quantize(x, rng=None):
    """Symmetric per-token int8 (round to nearest) over the last axis: x ~ scale * x8."""
    amax = np.abs(x).max(axis=-1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    x8 = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
    return x8, scale


def reference(q, k, v, seq_lens, *, sinks=None, causal=False, scale=None, softcap=None):
    """float64 truth. q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D / Dv) already dequantised / gathered; query i of
    sequence b at key position seq_lens[b] - Lq + i. Returns out (B, Hq, Lq, Dv), lse (B, Hq, Lq)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b_, hq, lq, d = q.shape
    group = hq // k.shape[1]
    scale = 1 / np.sqrt(d) if scale is None else scale
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    lse = np.full(q.shape[:-1], -np.inf)
    for b in range(b_):
        n = int(seq_lens[b])
        for h in range(hq):
            s = scale * q[b, h] @ k[b, h // group, :n].T  # (Lq, n)
            if softcap:
                s = softcap * np.tanh(s / softcap)
            if causal:
                pos = n - lq + np.arange(lq)
                s = np.where(np.arange(n)[None, :] <= pos[:, None], s, -np.inf)
            sink = -np.inf if sinks is None else float(sinks[h])
            top = np.maximum(np.max(s, axis=1, initial=-np.inf), sink)
            safe = np.where(np.isfinite(top), top, 0.0)
            e = np.exp(s - safe[:, None])
            denom = e.sum(axis=1) + np.exp(sink - safe)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[b, h] = np.where(denom[:, None] > 0, (e @ v[b, h // group, :n]) / denom[:, None], 0.0)
                lse[b, h] = np.where(denom > 0, safe + np.log(denom), -np.inf)
    return out, lse


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, atol=tol, rtol=tol)


def make_paged(rng, k, v, seq_lens, block_size, extra_blocks=3):
    """Scatter contiguous (B, Hkv, L, D) k / v into a shuffled pool: caches (num_blocks, block_size, Hkv, D)
    and a (B, max_blocks) table whose unused entries are -1 (never read: past the sequence)."""
    b_, hkv, lk, _ = k.shape
    max_blocks = max(1, -(-lk // block_size))
    needed = [-(-int(n) // block_size) for n in seq_lens]
    pool = sum(needed) + extra_blocks
    ids = rng.permutation(pool)
    table = np.full((b_, max_blocks), -1, dtype=np.int32)
    kc = np.full((pool, block_size, hkv) + k.shape[3:], 99, dtype=k.dtype)  # garbage that must never show
    vc = np.full((pool, block_size, hkv) + v.shape[3:], 99, dtype=v.dtype)
    at = 0
    for b in range(b_):
        for i in range(needed[b]):
            blk = ids[at]
            at += 1
            table[b, i] = blk
            lo, hi = i * block_size, min((i + 1) * block_size, int(seq_lens[b]))
            kc[blk, : hi - lo] = np.moveaxis(k[b, :, lo:hi], 0, 1)
            vc[blk, : hi - lo] = np.moveaxis(v[b, :, lo:hi], 0, 1)
    return kc, vc, table


def randn(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------------------------- sinks
@pytest.mark.parametrize("lq,lk", [(1, 5), (1, 1100), (7, 40), (70, 90), (3, 1100)])
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_sinks_dense(isa, rng, lq, lk, causal):
    b, hkv, group, d = 2, 2, 4, 40
    q, k, v = randn(rng, (b, hkv * group, lq, d)), randn(rng, (b, hkv, lk, d)), randn(rng, (b, hkv, lk, d))
    sinks = (rng.standard_normal(hkv * group) * 2).astype(np.float32)
    sinks[0] = 30.0  # dominates every row: the sink's own e^(sink - top) = 1 reference
    sinks[1] = -np.inf  # no sink for this head
    out, lse = _serving_call(q, k, v, sinks=sinks, causal=causal, return_lse=True)
    want_out, want_lse = reference(q, k, v, [lk] * b, sinks=sinks, causal=causal)
    assert_close(out, want_out, 2e-5)
    assert_close(lse, want_lse, 2e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, BF16])
def test_sinks_dtypes(isa, rng, dtype):
    if dtype is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    q, k, v = randn(rng, (1, 4, 7, 8), dtype), randn(rng, (1, 2, 33, 8), dtype), randn(rng, (1, 2, 33, 8), dtype)
    sinks = rng.standard_normal(4).astype(np.float64 if dtype is np.float64 else np.float32)
    for lq in (1, 7):
        out, lse = _serving_call(q[:, :, :lq], k, v, sinks=sinks, return_lse=True)
        want_out, want_lse = reference(q[:, :, :lq], k, v, [33], sinks=sinks)
        assert_close(out, want_out, tol_of(dtype))
        assert_close(lse, want_lse, 1e-12 if dtype is np.float64 else 2e-5)


def test_sinks_rows_without_keys(isa, rng):
    """A causal row whose keys are all masked: out 0, lse = the sink (seq_lens 0 and a window)."""
    q, k, v = randn(rng, (2, 2, 3, 16)), randn(rng, (2, 2, 9, 16)), randn(rng, (2, 2, 9, 16))
    sinks = np.array([0.5, -1.25], dtype=np.float32)
    out, lse = _serving_call(q, k, v, sinks=sinks, seq_lens=[0, 9], causal="bottom_right", return_lse=True)
    assert np.all(out[0] == 0)
    np.testing.assert_array_equal(lse[0], np.broadcast_to(sinks[:, None], (2, 3)))
    want_out, want_lse = reference(q, k, v, [0, 9], sinks=sinks, causal=True)
    assert_close(out, want_out, 2e-5)
    assert_close(lse, want_lse, 2e-5)


def test_sinks_weights(isa, rng):
    q, k = randn(rng, (2, 3, 70, 24)), randn(rng, (2, 3, 50, 24))
    sinks = rng.standard_normal(3).astype(np.float32)
    w = _serving_weights(q, k, sinks=sinks)
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(24)
    top = np.maximum(s.max(-1, keepdims=True), sinks[None, :, None, None])
    e = np.exp(s - top)
    want = e / (e.sum(-1, keepdims=True) + np.exp(sinks[None, :, None, None] - top))
    assert_close(w, want, 2e-5)
    assert np.all(w.sum(-1) < 1)


def test_sinks_with_dropout_ignore_the_sink(isa, rng):
    """Dropout zeroes key probabilities only; with p -> 0 the result is the undropped one (sanity), and
    the lse (of the undropped probabilities plus the sink) does not depend on the dropout at all."""
    q, k, v = randn(rng, (1, 2, 1, 16)), randn(rng, (1, 2, 200, 16)), randn(rng, (1, 2, 200, 16))
    sinks = np.array([0.3, 1.0], dtype=np.float32)
    _, lse_plain = _serving_call(q, k, v, sinks=sinks, return_lse=True)
    _, lse_drop = _serving_call(q, k, v, sinks=sinks, dropout_p=0.5, seed=3, return_lse=True)
    np.testing.assert_array_equal(lse_plain, lse_drop)


# ---------------------------------------------------------------------------------------------- int8
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, BF16])
@pytest.mark.parametrize("lq,d", [(1, 128), (7, 40), (70, 8), (1, 8)])
def test_int8_dense(isa, rng, dtype, lq, d):
    if dtype is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    b, hkv, group, lk = 2, 2, 4, 77
    q = randn(rng, (b, hkv * group, lq, d), dtype)
    k8, ks = quantize(randn(rng, (b, hkv, lk, d)))
    v8, vs = quantize(randn(rng, (b, hkv, lk, d)) * 3)
    sinks = rng.standard_normal(hkv * group).astype(np.float64 if dtype is np.float64 else np.float32)
    out, lse = _serving_call(q, k8, v8, k_scale=ks, v_scale=vs, sinks=sinks, causal="bottom_right", softcap=7.0,
                             return_lse=True)
    kd = k8.astype(np.float64) * ks[..., None]
    vd = v8.astype(np.float64) * vs[..., None]
    want_out, want_lse = reference(q, kd, vd, [lk] * b, sinks=sinks, causal=True, softcap=7.0)
    assert_close(out, want_out, 3 * tol_of(dtype))  # |v| ~ 3 here: outputs three times the usual size
    assert_close(lse, want_lse, 1e-12 if dtype is np.float64 else 2e-5)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("d,dv", [(8, 8), (80, 96), (128, 128), (256, 40)])
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
def test_decode_groups_and_dims(isa, rng, group, d, dv, storage):
    """One query per head (the decode layout) for every way it reads K / V: in place or widened into
    scratch, rows one at a time or four at a time (groups of 4 and 8, with leftover rows for 5), head dims
    with and without a compiled score loop, value dims that are not a multiple of the four-vector tiles."""
    if storage == "bfloat16" and BF16 is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    b, hkv, lk = 2, 2, int(rng.integers(60, 200))
    dtype = BF16 if storage == "bfloat16" else np.float32
    q = randn(rng, (b, hkv * group, 1, d), dtype)
    k, v = randn(rng, (b, hkv, lk, d), dtype), randn(rng, (b, hkv, lk, dv), dtype)
    options = {}
    if storage == "int8":
        k, ks = quantize(k)
        v, vs = quantize(v)
        options = dict(k_scale=ks, v_scale=vs)
        kd, vd = k.astype(np.float64) * ks[..., None], v.astype(np.float64) * vs[..., None]
    else:
        kd, vd = k, v
    out = _serving_call(q, k, v, **options)
    want, _ = reference(q, kd, vd, [lk] * b)
    assert_close(out, want, tol_of(dtype))


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
def test_decode_read_ahead_changes_no_bit(isa, rng, storage):
    """Decode's software read-ahead of contiguous one-row streams (on by default on Intel CPUs) only issues
    prefetches: on and off give the same bits, through both the row loops (group 1) and the grouped ones."""
    if storage == "bfloat16" and BF16 is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    dtype = BF16 if storage == "bfloat16" else np.float32
    for group in (1, 4):
        q = randn(rng, (2, 2 * group, 1, 128), dtype)
        k, v = randn(rng, (2, 2, 700, 128), dtype), randn(rng, (2, 2, 700, 128), dtype)
        options = {}
        if storage == "int8":
            (k, ks), (v, vs) = quantize(k), quantize(v)
            options = dict(k_scale=ks, v_scale=vs)
        runs = []
        for mode in (True, False):
            _backend.set_decode_read_ahead(mode)
            try:
                runs.append(_serving_call(q, k, v, return_lse=True, **options))
            finally:
                _backend.set_decode_read_ahead(None)
        np.testing.assert_array_equal(runs[0][0], runs[1][0])
        np.testing.assert_array_equal(runs[0][1], runs[1][1])


def test_decode_read_ahead_switch():
    import fusedattn

    try:
        for mode in (True, False):
            _backend.set_decode_read_ahead(mode)
            assert fusedattn.backend_info()["decode_read_ahead"] is mode
    finally:
        _backend.set_decode_read_ahead(None)
    with pytest.raises(TypeError, match="mode must be True, False or None, got int"):
        _backend.set_decode_read_ahead(1)


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU's vendor from Linux's /proc/cpuinfo")
@pytest.mark.skipif(bool(os.environ.get("FUSEDATTN_DECODE_READ_AHEAD")),
                    reason="FUSEDATTN_DECODE_READ_AHEAD overrides the CPU's default in this process")
def test_decode_read_ahead_default_follows_the_vendor():
    import fusedattn

    with open("/proc/cpuinfo") as f:
        intel = "GenuineIntel" in f.read()
    assert fusedattn.backend_info()["decode_read_ahead"] is intel


def test_int8_noncontiguous(isa, rng):
    """Strided q, int8 k with a column stride, scales with a row stride: every layout through row()."""
    q = randn(rng, (1, 4, 3, 32))[..., ::2]  # D = 16, column stride 2
    kbig8, ks_big = quantize(randn(rng, (1, 2, 40, 32)))
    k8, ks = kbig8[..., ::2], ks_big  # scales of the full rows: any positive per-token scale is valid
    v8, vs = quantize(randn(rng, (1, 2, 40, 16)))
    vs_strided = np.repeat(vs, 2, axis=-1)[..., ::2]
    for lq in (1, 3):
        out = _serving_call(q[:, :, :lq], k8, v8, k_scale=ks, v_scale=vs_strided)
        want, _ = reference(q[:, :, :lq], k8 * ks[..., None].astype(np.float64), v8 * vs[..., None].astype(np.float64),
                            [40])
        assert_close(out, want, 2e-5)


# --------------------------------------------------------------------------------------------- paged
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("lq,group,d", [(1, 1, 128), (1, 8, 40), (3, 4, 40), (7, 4, 8), (70, 1, 40)])
@pytest.mark.parametrize("int8", [False, True])
def test_paged(isa, rng, block_size, lq, group, d, int8):
    hkv = 2
    seq_lens = np.array([0, 1, 37, 150, lq + 3])
    b, lk = len(seq_lens), int(seq_lens.max())
    q = randn(rng, (b, hkv * group, lq, d))
    k, v = randn(rng, (b, hkv, lk, d)), randn(rng, (b, hkv, lk, d))
    sinks = rng.standard_normal(hkv * group).astype(np.float32)
    kw = {}
    if int8:
        k8, ks = quantize(k)
        v8, vs = quantize(v)
        k, v = k8.astype(np.float64) * ks[..., None], v8.astype(np.float64) * vs[..., None]
        # one seed for both calls: the scales land in the same (shuffled) blocks as their tokens
        kc, vc, table = make_paged(np.random.default_rng(5), k8, v8, seq_lens, block_size)
        ksc, vsc, _ = make_paged(np.random.default_rng(5), ks[..., None], vs[..., None], seq_lens, block_size)
        ksc, vsc = ksc[..., 0], vsc[..., 0]
        kw = dict(k_scale=ksc, v_scale=vsc)
    else:
        kc, vc, table = make_paged(rng, k, v, seq_lens, block_size)
    for causal in (False, "bottom_right"):
        out, lse = _serving_call(q, kc, vc, block_table=table, seq_lens=seq_lens, sinks=sinks, causal=causal,
                                 return_lse=True, **kw)
        want_out, want_lse = reference(q, k, v, seq_lens, sinks=sinks, causal=bool(causal))
        assert_close(out, want_out, 2e-5)
        assert_close(lse, want_lse, 2e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, BF16])
@pytest.mark.parametrize("lq,group", [(1, 4), (3, 1), (1, 8)])
def test_paged_int8_any_query_dtype(isa, rng, dtype, lq, group):
    """int8 pools under a float64 (computed in float64) or 16-bit q (in float32, out rounded to q's dtype)."""
    if dtype is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    hkv, d, block_size = 2, 40, 5
    seq_lens = np.array([0, 1, 37, 150])
    b, lk = len(seq_lens), int(seq_lens.max())
    q = randn(rng, (b, hkv * group, lq, d), dtype)
    (k8, ks), (v8, vs) = quantize(randn(rng, (b, hkv, lk, d))), quantize(randn(rng, (b, hkv, lk, d)))
    kc, vc, table = make_paged(np.random.default_rng(5), k8, v8, seq_lens, block_size)
    ksc, vsc, _ = make_paged(np.random.default_rng(5), ks[..., None], vs[..., None], seq_lens, block_size)
    sinks = rng.standard_normal(hkv * group).astype(np.float64 if dtype is np.float64 else np.float32)
    out, lse = _serving_call(q, kc, vc, block_table=table, seq_lens=seq_lens, k_scale=ksc[..., 0], v_scale=vsc[..., 0],
                             sinks=sinks, causal="bottom_right", return_lse=True)
    kd, vd = k8.astype(np.float64) * ks[..., None], v8.astype(np.float64) * vs[..., None]
    want_out, want_lse = reference(q, kd, vd, seq_lens, sinks=sinks, causal=True)
    assert out.dtype == dtype
    assert_close(out, want_out, tol_of(dtype))
    assert_close(lse, want_lse, 1e-12 if dtype is np.float64 else 2e-5)


@pytest.mark.parametrize("lengths", [(9000, 1, 700), (300, 1, 57)], ids=["long", "short"])
@pytest.mark.parametrize("int8", [False, True])
def test_paged_equals_contiguous_decode(isa, rng, int8, lengths):
    """Decode reads the same elements in the same order from a pool as from contiguous K / V, and splits
    the keys alike (the split counts batch x kv heads either way): the same bits, with every bias on, for
    long sequences (split keys) and short ones. Short paged work items cut per kv group:
    test_short_paged_sequence_shares_its_kv_heads_among_threads."""
    seq_lens = np.array(lengths)
    q = randn(rng, (3, 8, 1, 64))
    k, v = randn(rng, (3, 2, max(lengths), 64)), randn(rng, (3, 2, max(lengths), 64))
    kw = dict(seq_lens=seq_lens, sinks=rng.standard_normal(8).astype(np.float32), softcap=5.0, window=(3000, 0),
              alibi_slopes=np.linspace(0.001, 0.01, 8), return_lse=True)
    if int8:
        (k, ks), (v, vs) = quantize(k), quantize(v)
        kc, vc, table = make_paged(np.random.default_rng(2), k, v, seq_lens, 16)
        ksc, vsc, _ = make_paged(np.random.default_rng(2), ks[..., None], vs[..., None], seq_lens, 16)
        paged = _serving_call(q, kc, vc, block_table=table, k_scale=ksc[..., 0], v_scale=vsc[..., 0], **kw)
        dense = _serving_call(q, k, v, k_scale=ks, v_scale=vs, **kw)
    else:
        kc, vc, table = make_paged(rng, k, v, seq_lens, 16)
        paged = _serving_call(q, kc, vc, block_table=table, **kw)
        dense = _serving_call(q, k, v, **kw)
    np.testing.assert_array_equal(paged[0], dense[0])
    np.testing.assert_array_equal(paged[1], dense[1])


def test_one_long_paged_sequence_splits_beyond_its_kv_heads(isa, rng):
    """One sequence, 8 kv heads, 20000 keys: a paged item holds every kv head, so the plan splits a long cache
    by the batch alone (9 splits of >= 2048 keys here) so that more than 8 threads find work. Against the
    float64 truth (float32: 2e-5, the module's argument; 20000 keys add ~sqrt(20000) eps32 ~ 1e-5 relative to
    each sum, well inside it), bit for bit against contiguous K / V, and the same bits at 1, 2, 3 and 16
    threads."""
    n = 20000
    q = randn(rng, (1, 16, 1, 16))
    k, v = randn(rng, (1, 8, n, 16)), randn(rng, (1, 8, n, 16))
    kc, vc, table = make_paged(rng, k, v, [n], 16)
    paged = lambda t: _serving_call(q, kc, vc, block_table=table, seq_lens=[n], num_threads=t, return_lse=True)
    out, lse = paged(1)
    expected_out, expected_lse = reference(q, k, v, [n])
    assert_close(out, expected_out, 2e-5)
    assert_close(lse, expected_lse, 2e-5)
    dense_out, dense_lse = _serving_call(q, k, v, seq_lens=[n], num_threads=2, return_lse=True)
    np.testing.assert_array_equal(out, dense_out)
    np.testing.assert_array_equal(lse, dense_lse)
    for threads in (2, 3, 16):
        np.testing.assert_array_equal(paged(threads)[0], out)


def test_short_paged_sequence_shares_its_kv_heads_among_threads(isa, rng):
    """One sequence of 480 keys (too short for key splits), 8 kv heads, on 2 and 3 threads: its work items are
    its kv groups, not the whole sequence (DimLanes::heads_per_item), and give the bits of one thread's single
    item and of contiguous K / V; against the float64 truth with the float32 tolerance (2e-5, the module's
    argument)."""
    q = randn(rng, (1, 32, 1, 128))
    k, v = randn(rng, (1, 8, 480, 128)), randn(rng, (1, 8, 480, 128))
    kc, vc, table = make_paged(rng, k, v, [480], 16)
    paged = lambda t: _serving_call(q, kc, vc, block_table=table, seq_lens=[480], num_threads=t, return_lse=True)
    out, lse = paged(1)
    expected_out, expected_lse = reference(q, k, v, [480])
    assert_close(out, expected_out, 2e-5)
    assert_close(lse, expected_lse, 2e-5)
    for threads in (2, 3):
        got_out, got_lse = paged(threads)
        np.testing.assert_array_equal(got_out, out)
        np.testing.assert_array_equal(got_lse, lse)
        dense_out, dense_lse = _serving_call(q, k, v, seq_lens=[480], num_threads=threads, return_lse=True)
        np.testing.assert_array_equal(got_out, dense_out)
        np.testing.assert_array_equal(got_lse, dense_lse)


def test_paged_bad_block_id_is_refused(rng):
    q = randn(rng, (1, 2, 1, 8))
    kc, vc = randn(rng, (4, 16, 2, 8)), randn(rng, (4, 16, 2, 8))
    with pytest.raises(ValueError, match="outside the pool"):
        _serving_call(q, kc, vc, block_table=np.array([[0, 4]]), seq_lens=[20])
    with pytest.raises(ValueError, match="longer than its block table"):
        _serving_call(q, kc, vc, block_table=np.array([[0, 1]]), seq_lens=[33])
    with pytest.raises(ValueError, match="needs seq_lens"):
        _serving_call(q, kc, vc, block_table=np.array([[0, 1]]))


# ------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("case", ["dense", "gqa_prefill", "paged_int8"])
def test_bit_identical_at_any_thread_count(isa, rng, case):
    """The key split is a function of the shape: 1, 2, 3 and 8 threads give the same bits."""
    if case == "dense":
        q, k, v = randn(rng, (1, 4, 1, 40)), randn(rng, (1, 4, 5000, 40)), randn(rng, (1, 4, 5000, 40))
        call = lambda t: _serving_call(q, k, v, sinks=np.ones(4, np.float32), num_threads=t, return_lse=True)
    elif case == "gqa_prefill":
        q, k, v = randn(rng, (1, 4, 9, 40)), randn(rng, (1, 1, 2100, 40)), randn(rng, (1, 1, 2100, 40))
        call = lambda t: _serving_call(q, k, v, causal="bottom_right", num_threads=t, return_lse=True)
    else:
        seq_lens = np.array([4100, 17])
        q = randn(rng, (2, 8, 1, 32))
        k8, ks = quantize(randn(rng, (2, 1, 4100, 32)))
        v8, vs = quantize(randn(rng, (2, 1, 4100, 32)))
        kc, vc, table = make_paged(np.random.default_rng(1), k8, v8, seq_lens, 16)
        ksc, vsc, _ = make_paged(np.random.default_rng(1), ks[..., None], vs[..., None], seq_lens, 16)
        call = lambda t: _serving_call(q, kc, vc, block_table=table, seq_lens=seq_lens, k_scale=ksc[..., 0],
                                       v_scale=vsc[..., 0], num_threads=t, return_lse=True)
    first_out, first_lse = call(1)
    for threads in (2, 3, 8):
        out, lse = call(threads)
        np.testing.assert_array_equal(out, first_out)
        np.testing.assert_array_equal(lse, first_lse)
