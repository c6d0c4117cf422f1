"""KVCache: token-by-token decoding equals full causal attention, and the cache never copies.

Tolerances: conftest's (float32 2e-5, float64 1e-12): each decoding step is one fused attention call
over a strided view of the cache, compared with the float64 reference over the whole sequence.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import randn, tol
from fusedattn import reference
from fusedattn.kv_cache import KVCache

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hq,hkv,d,dv", [(4, 4, 16, 16), (8, 2, 32, 24), (6, 1, 8, 40)],
                         ids=["mha", "gqa", "mqa_dv"])
def test_decode_token_by_token_matches_full_causal(isa, rng, dtype, hq, hkv, d, dv):
    b, length = 2, 23
    q = randn(rng, (b, hq, length, d), dtype)
    k = randn(rng, (b, hkv, length, d), dtype)
    v = randn(rng, (b, hkv, length, dv), dtype)
    full = reference.attention(q, k, v, causal=True)

    cache = KVCache(b, hkv, max_len=32, head_dim=d, value_dim=dv, dtype=dtype)
    steps = []
    for t in range(length):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert len(cache) == cache.length == t + 1
        steps.append(cache.attend(q[:, :, t:t + 1]))
    out = np.concatenate(steps, axis=2)
    assert out.dtype == dtype and out.shape == (b, hq, length, dv)
    np.testing.assert_allclose(out, full, **tol(dtype))
    np.testing.assert_array_equal(cache.keys, k)
    np.testing.assert_array_equal(cache.values, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_prefill_then_decode(isa, rng, dtype):
    """A multi-token chunk (bottom-right causal) followed by single tokens and a second chunk."""
    b, hq, hkv, d, length = 1, 8, 2, 16, 20
    q = randn(rng, (b, hq, length, d), dtype)
    k = randn(rng, (b, hkv, length, d), dtype)
    v = randn(rng, (b, hkv, length, d), dtype)
    full = reference.attention(q, k, v, causal=True)
    cache = KVCache(b, hkv, max_len=length, head_dim=d, dtype=dtype)
    outs = []
    for start, stop in ((0, 9), (9, 10), (10, 11), (11, 17), (17, 20)):
        cache.append(k[:, :, start:stop], v[:, :, start:stop])
        outs.append(cache.attend(q[:, :, start:stop]))
    np.testing.assert_allclose(np.concatenate(outs, axis=2), full, **tol(dtype))


def test_attend_options(rng):
    b, h, d = 2, 4, 8
    k, v = randn(rng, (b, h, 10, d)), randn(rng, (b, h, 10, d))
    cache = KVCache(b, h, max_len=16, head_dim=d)
    cache.append(k, v)
    q = randn(rng, (b, h, 3, d))
    # causal=False sees the whole cache (cross-attention to an encoder's keys/values) ...
    np.testing.assert_allclose(cache.attend(q, causal=False), reference.attention(q, k, v), **tol(np.float32))
    # ... and mask / scale / top-left causal are forwarded.
    mask = rng.random((3, 10)) > 0.4
    mask[:, 0] = True
    np.testing.assert_allclose(cache.attend(q, causal=True, mask=mask, scale=0.3),
                               reference.attention(q, k, v, causal=True, mask=mask, scale=0.3), **tol(np.float32))
    # An empty cache: every query attends nothing and gets 0.
    cache.reset()
    np.testing.assert_array_equal(cache.attend(q), 0.0)


def test_keys_are_views_of_the_preallocated_buffer(rng):
    cache = KVCache(2, 2, max_len=8, head_dim=4, value_dim=3)
    kb, vb = cache.key_buffer, cache.value_buffer
    assert kb.shape == (2, 2, 8, 4) and vb.shape == (2, 2, 8, 3)
    cache.append(randn(rng, (2, 2, 3, 4)), randn(rng, (2, 2, 3, 3)))
    keys, values = cache.keys, cache.values
    assert keys.shape == (2, 2, 3, 4) and values.shape == (2, 2, 3, 3)
    assert np.shares_memory(keys, kb) and np.shares_memory(values, vb)
    assert keys.ctypes.data == kb.ctypes.data and keys.strides == kb.strides  # the prefix, in place
    cache.append(randn(rng, (2, 2, 1, 4)), randn(rng, (2, 2, 1, 3)))
    assert cache.key_buffer is kb  # appending writes into the same buffer, never reallocates
    assert np.shares_memory(cache.keys, keys)
    assert not keys.flags.writeable  # writes go through append()


def test_full_cache_raises_and_keeps_state(rng):
    cache = KVCache(1, 2, max_len=5, head_dim=4)
    cache.append(randn(rng, (1, 2, 4, 4)), randn(rng, (1, 2, 4, 4)))
    before = cache.keys.copy()
    with pytest.raises(ValueError, match=r"KVCache is full: capacity max_len=5, it holds 4 tokens and 2 more were requested"):
        cache.append(randn(rng, (1, 2, 2, 4)), randn(rng, (1, 2, 2, 4)))
    assert cache.length == 4
    np.testing.assert_array_equal(cache.keys, before)
    cache.append(randn(rng, (1, 2, 1, 4)), randn(rng, (1, 2, 1, 4)))  # exactly full is fine
    assert len(cache) == 5
    cache.append(np.zeros((1, 2, 0, 4), np.float32), np.zeros((1, 2, 0, 4), np.float32))  # n = 0 is fine too


def test_reset_reuses_the_buffer(rng):
    cache = KVCache(1, 1, max_len=4, head_dim=2)
    cache.append(randn(rng, (1, 1, 4, 2)), randn(rng, (1, 1, 4, 2)))
    cache.reset()
    assert len(cache) == 0 and cache.keys.shape == (1, 1, 0, 2)
    k, v = randn(rng, (1, 1, 2, 2)), randn(rng, (1, 1, 2, 2))
    cache.append(k, v)
    q = randn(rng, (1, 1, 1, 2))
    np.testing.assert_allclose(cache.attend(q), reference.attention(q, k, v), **tol(np.float32))


def test_append_accepts_strided_inputs(rng):
    # (B, L, H, D) projections viewed as (B, H, L, D): the cache copies them in, whatever the strides.
    blhd = randn(rng, (2, 5, 3, 4))
    cache = KVCache(2, 3, max_len=5, head_dim=4)
    cache.append(blhd.swapaxes(1, 2), blhd.swapaxes(1, 2)[..., ::-1])
    np.testing.assert_array_equal(cache.keys, blhd.swapaxes(1, 2))
    np.testing.assert_array_equal(cache.values, blhd.swapaxes(1, 2)[..., ::-1])


def _append_errors():
    ok_k, ok_v = np.zeros((2, 3, 1, 4), np.float32), np.zeros((2, 3, 1, 5), np.float32)
    return [
        ("k_dtype", (ok_k.astype(np.float64), ok_v), TypeError, r"k_new must have dtype float32 \(the cache's dtype\), got float64"),
        ("v_dtype", (ok_k, ok_v.astype(np.float16)), TypeError, r"v_new must have dtype float32.*float16"),
        ("k_int", (ok_k.astype(np.int32), ok_v), TypeError, r"k_new.*int32"),
        ("k_rank", (ok_k[0], ok_v), ValueError, r"k_new must have shape \(batch=2, num_kv_heads=3, n, head_dim=4\), got \(3, 1, 4\)"),
        ("k_batch", (ok_k[:1], ok_v), ValueError, r"k_new must have shape \(batch=2"),
        ("k_heads", (ok_k[:, :2], ok_v), ValueError, r"k_new must have shape .*num_kv_heads=3"),
        ("k_dim", (ok_k[..., :3], ok_v), ValueError, r"k_new must have shape .*head_dim=4"),
        ("v_dim", (ok_k, ok_v[..., :4]), ValueError, r"v_new must have shape .*value_dim=5"),
        ("n_mismatch", (ok_k, np.zeros((2, 3, 2, 5), np.float32)), ValueError, r"k_new and v_new must hold the same number of tokens"),
    ]


@pytest.mark.parametrize("name,args,exc,pattern", _append_errors(), ids=[c[0] for c in _append_errors()])
def test_append_errors(name, args, exc, pattern):
    cache = KVCache(2, 3, max_len=4, head_dim=4, value_dim=5)
    with pytest.raises(exc, match=pattern):
        cache.append(*args)
    assert len(cache) == 0


@pytest.mark.parametrize("q,exc,pattern", [
    (np.zeros((2, 6, 1, 4)), TypeError, r"q must have dtype float32 \(the cache's dtype\), got float64"),
    (np.zeros((6, 1, 4), np.float32), ValueError, r"q must have shape \(batch=2, Hq, Lq, head_dim=4\)"),
    (np.zeros((1, 6, 1, 4), np.float32), ValueError, r"q must have shape \(batch=2"),
    (np.zeros((2, 6, 1, 5), np.float32), ValueError, r"head_dim=4\), got \(2, 6, 1, 5\)"),
    (np.zeros((2, 4, 1, 4), np.float32), ValueError, r"positive multiple of the cache's num_kv_heads=3.*Hq=4"),
    (np.zeros((2, 0, 1, 4), np.float32), ValueError, r"num_kv_heads=3.*Hq=0"),
])
def test_attend_errors(q, exc, pattern):
    cache = KVCache(2, 3, max_len=4, head_dim=4)
    with pytest.raises(exc, match=pattern):
        cache.attend(q)


def test_attend_forwards_kernel_errors():
    cache = KVCache(1, 1, max_len=4, head_dim=2)
    cache.append(np.zeros((1, 1, 2, 2), np.float32), np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"\bcausal\b"):
        cache.attend(np.zeros((1, 1, 1, 2), np.float32), causal="bottom-right")
    with pytest.raises(ValueError, match=r"\bmask\b.*broadcastable"):
        cache.attend(np.zeros((1, 1, 1, 2), np.float32), mask=np.ones((1, 3), bool))


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(batch=0, num_kv_heads=1, max_len=4, head_dim=2), ValueError, r"batch must be >= 1, got 0"),
    (dict(batch=1, num_kv_heads=1.0, max_len=4, head_dim=2), TypeError, r"num_kv_heads must be a positive int"),
    (dict(batch=1, num_kv_heads=1, max_len=0, head_dim=2), ValueError, r"max_len must be >= 1"),
    (dict(batch=1, num_kv_heads=1, max_len=4, head_dim=513), ValueError, r"head_dim must be between 1 and 512, got 513"),
    (dict(batch=1, num_kv_heads=1, max_len=4, head_dim=2, value_dim=0), ValueError, r"value_dim must be between 1 and 512"),
    (dict(batch=1, num_kv_heads=1, max_len=4, head_dim=2, dtype=np.complex64), TypeError, r"dtype must be float32 or float64"),
    (dict(batch=True, num_kv_heads=1, max_len=4, head_dim=2), TypeError, r"batch must be a positive int"),
])
def test_constructor_errors(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        KVCache(**kwargs)


def test_repr_and_attributes():
    cache = KVCache(2, 4, max_len=16, head_dim=8, value_dim=6, dtype=np.float64)
    assert (cache.batch, cache.num_kv_heads, cache.max_len, cache.head_dim, cache.value_dim) == (2, 4, 16, 8, 6)
    assert cache.dtype == np.float64 and cache.keys.dtype == np.float64
    assert repr(cache) == "KVCache(batch=2, num_kv_heads=4, max_len=16, head_dim=8, value_dim=6, dtype=float64, length=0)"


# ---------------------------------------------------------------------------------------------
# int8 storage and sinks (issue #15)
# ---------------------------------------------------------------------------------------------

def _dequantised_attention(q, codes_k, scale_k, codes_v, scale_v, sinks=None):
    """float64 bottom-right causal attention on the dequantised cache (with the sink in the denominator)."""
    k = codes_k.astype(np.float64) * scale_k[..., None]
    v = codes_v.astype(np.float64) * scale_v[..., None]
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k) / np.sqrt(q.shape[-1])
    lq, lk = q.shape[2], k.shape[2]
    s = np.where(np.arange(lk)[None, :] <= np.arange(lq)[:, None] + lk - lq, s, -np.inf)
    if sinks is not None:
        s = np.concatenate([s, np.broadcast_to(sinks.astype(np.float64)[:, None, None], s.shape[:3] + (1,))], axis=-1)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p[..., :lk] @ v


@pytest.mark.parametrize("q_dtype", [np.float32, np.float64])  # float64 q: computed in float64, float64 out
@pytest.mark.parametrize("append_dtype", [np.float32, np.float64])
def test_int8_cache_decoding(rng, append_dtype, q_dtype):
    from fusedattn import quantize_kv

    b, hq, hkv, d, dv, length = 2, 8, 2, 32, 16, 19
    k = randn(rng, (b, hkv, length, d), append_dtype)
    v = randn(rng, (b, hkv, length, dv), append_dtype)
    q = randn(rng, (b, hq, length, d), q_dtype)
    cache = KVCache(b, hkv, max_len=24, head_dim=d, value_dim=dv, dtype=np.int8)
    assert cache.quantized and cache.key_buffer.dtype == np.int8 and cache.key_scale_buffer.shape == (b, hkv, 24)
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    outs = []
    for start, stop in ((0, 7), (7, 8), (8, 9), (9, 19)):  # a prefill chunk, two steps, another chunk
        cache.append(k[:, :, start:stop], v[:, :, start:stop])
        outs.append(cache.attend(q[:, :, start:stop]))
        expected = _dequantised_attention(q[:, :, start:stop], kq[:, :, :stop], ks[:, :, :stop], vq[:, :, :stop],
                                          vs[:, :, :stop])
        assert outs[-1].dtype == q_dtype
        np.testing.assert_allclose(outs[-1], expected, **tol(q_dtype))
    np.testing.assert_array_equal(cache.keys, kq)
    np.testing.assert_array_equal(cache.key_scales, ks)
    np.testing.assert_array_equal(cache.values, vq)
    np.testing.assert_array_equal(cache.value_scales, vs)
    # The quantised cache stays close to float attention (the bound itself: tests/test_paged.py).
    full = reference.attention(q, k.astype(np.float32), v.astype(np.float32), causal=True)
    assert np.abs(np.concatenate(outs, axis=2) - full).max() < 0.05


def test_int8_cache_passes_views_not_dequantised_copies(rng, monkeypatch):
    import fusedattn

    cache = KVCache(1, 2, max_len=8, head_dim=4, dtype=np.int8)
    cache.append(randn(rng, (1, 2, 3, 4)), randn(rng, (1, 2, 3, 4)))
    seen = {}

    def spy(q, k, v, **kwargs):
        seen.update(kwargs, k=k, v=v)
        return "sentinel"

    monkeypatch.setattr(fusedattn, "attention", spy)
    assert cache.attend(np.zeros((1, 2, 1, 4), np.float32), sinks=np.zeros(2, np.float32)) == "sentinel"
    assert seen["k"].dtype == seen["v"].dtype == np.int8
    for name, buffer in (("k", cache.key_buffer), ("v", cache.value_buffer), ("k_scale", cache.key_scale_buffer),
                         ("v_scale", cache.value_scale_buffer)):
        assert np.shares_memory(seen[name], buffer), name
    assert seen["k_scale"].shape == (1, 2, 3) and seen["k_scale"].dtype == np.float32
    assert "sinks" in seen


def test_int8_cache_errors(rng):
    cache = KVCache(1, 1, max_len=4, head_dim=2, dtype=np.int8)
    with pytest.raises(TypeError, match=r"k_new must be a float32, float64, float16 or bfloat16 array.*int8"):
        cache.append(np.zeros((1, 1, 1, 2), np.int8), np.zeros((1, 1, 1, 2), np.float32))
    with pytest.raises(ValueError, match=r"x must be finite"):
        cache.append(np.zeros((1, 1, 1, 2), np.float32), np.full((1, 1, 1, 2), np.inf, np.float32))
    assert len(cache) == 0  # nothing written
    cache.append(np.ones((1, 1, 1, 2)), np.ones((1, 1, 1, 2)))
    with pytest.raises(TypeError, match=r"q must have dtype float32, float64, float16 or bfloat16 \(ml_dtypes\) with an "
                                        r"int8 cache, got int32"):
        cache.attend(np.zeros((1, 1, 1, 2), np.int32))
    assert repr(cache) == "KVCache(batch=1, num_kv_heads=1, max_len=4, head_dim=2, dtype=int8, length=1)"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attend_with_sinks(rng, dtype):
    b, hq, hkv, d = 2, 4, 2, 8
    cache = KVCache(b, hkv, max_len=16, head_dim=d, dtype=dtype)
    k, v = randn(rng, (b, hkv, 11, d), dtype), randn(rng, (b, hkv, 11, d), dtype)
    cache.append(k, v)
    q = randn(rng, (b, hq, 3, d), dtype)
    sinks = np.array([-1.0, 0.0, 2.0, 5.0], dtype)
    out = cache.attend(q, sinks=sinks)
    ones = np.ones(k.shape[:-1], np.float64)
    np.testing.assert_allclose(out, _dequantised_attention(q, k, ones, v, ones, sinks=sinks), **tol(dtype))
