"""The oracle itself: fusedattn.reference against an independent brute-force implementation.

The brute force below shares no code with the reference (nor with fusedattn._checks): explicit
Python loops over every (batch, head, query) row and every key, ``math.fsum`` and ``math.exp``.
It is slow, so shapes here are tiny.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import make_qkv, randn
from fusedattn import reference

# The reference computes in float64 with BLAS matmuls (a different summation order from the
# brute force's fsum); for O(1) inputs both are within a few ulps of the truth, so 1e-12 is ample.
F64 = dict(atol=1e-12, rtol=1e-12)
# float32 inputs: the reference rounds its float64 result to float32 once, i.e. relative error
# <= 2^-24 ~ 6e-8 (plus the same few float64 ulps); 1e-6 leaves headroom.
F32 = dict(atol=1e-6, rtol=1e-6)


def brute_force(q, k, v, mask=None, causal=False, scale=None):
    """Attention by definition, one row at a time. Returns float64 (out, lse) in the user's shapes."""
    q, k, v = (np.asarray(x) for x in (q, k, v))
    dtype = q.dtype
    rank = q.ndim
    lq, d = q.shape[-2:]
    lk, dv = v.shape[-2:]
    scores_shape = q.shape[:-1] + (lk,)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            mask = mask.astype(dtype)  # the documented conversion of a float mask to the inputs' dtype
        mask = np.broadcast_to(mask, scores_shape)

    def heads(x):  # (L, D) -> (1, 1, L, D); (B, L, D) -> (B, 1, L, D); else unchanged
        if rank == 2:
            return x.reshape((1, 1) + x.shape)
        if rank == 3:
            return x.reshape((x.shape[0], 1) + x.shape[1:])
        return x

    q4, k4, v4 = heads(q), heads(k), heads(v)
    m4 = heads(mask) if mask is not None else None
    hq, hkv = q4.shape[-3], k4.shape[-3]
    group = hq // hkv
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if causal is True or causal == "top_left":
        offset = 0
    elif causal == "bottom_right":
        offset = lk - lq
    else:
        offset = None

    out = np.zeros(q4.shape[:-1] + (dv,))
    lse = np.zeros(q4.shape[:-1])
    for idx in np.ndindex(*q4.shape[:-1]):
        *b, h, i = idx
        b = tuple(b)
        hk = h // group
        logits = []  # (j, score) of the keys this row may attend
        for j in range(lk):
            if offset is not None and j > i + offset:
                continue
            s = math.fsum(float(q4[b + (h, i, c)]) * float(k4[b + (hk, j, c)]) for c in range(d)) * scale
            if m4 is not None:
                mv = m4[b + (h, i, j)]
                if m4.dtype == np.bool_:
                    if not mv:
                        continue
                else:
                    s += float(mv)
            logits.append((j, s))
        if any(math.isnan(s) for _, s in logits):
            out[idx] = np.nan
            lse[idx] = np.nan
            continue
        logits = [(j, s) for j, s in logits if s != -math.inf]
        if not logits:
            out[idx] = 0.0
            lse[idx] = -math.inf
            continue
        mx = max(s for _, s in logits)
        weights = [(j, math.exp(s - mx)) for j, s in logits]
        z = math.fsum(w for _, w in weights)
        for c in range(dv):
            out[idx + (c,)] = math.fsum(w * float(v4[b + (hk, j, c)]) for j, w in weights) / z
        lse[idx] = mx + math.log(z)
    return out.reshape(q.shape[:-1] + (dv,)), lse.reshape(q.shape[:-1])


def check_reference(q, k, v, **kwargs):
    out, lse = reference.attention(q, k, v, return_lse=True, **kwargs)
    bf_out, bf_lse = brute_force(q, k, v, **kwargs)
    dtype = np.asarray(q).dtype
    assert out.dtype == dtype and lse.dtype == dtype
    assert out.shape == bf_out.shape and lse.shape == bf_lse.shape
    t = F64 if dtype == np.float64 else F32
    np.testing.assert_allclose(out, bf_out, equal_nan=True, **t)
    np.testing.assert_allclose(lse, bf_lse, equal_nan=True, **t)
    dead = np.isneginf(bf_lse)
    assert np.all(out[dead] == 0) and np.all(np.isneginf(lse[dead]))
    return out, lse


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("lq,lk,d,dv", [(1, 1, 1, 1), (3, 5, 4, 4), (5, 3, 3, 6), (4, 4, 8, 2)])
def test_plain(dtype, lq, lk, d, dv):
    rng = np.random.default_rng(1000 + lq * 100 + lk * 10 + d)
    q, k, v = make_qkv(rng, lq, lk, d, dv, batch=(2,), hq=2, dtype=dtype)
    check_reference(q, k, v)


@pytest.mark.parametrize("causal", [True, "top_left", "bottom_right"])
@pytest.mark.parametrize("lq,lk", [(3, 6), (6, 3), (4, 4), (1, 5), (5, 1)])
def test_causal_alignments(causal, lq, lk):
    rng = np.random.default_rng(2000 + lq * 10 + lk)
    q, k, v = make_qkv(rng, lq, lk, 3, batch=(1,), hq=2, dtype=np.float64)
    out, lse = check_reference(q, k, v, causal=causal)
    if causal == "bottom_right" and lq > lk:
        # The first lq - lk queries see no key at all.
        assert np.all(np.isneginf(lse[..., : lq - lk])) and np.all(out[..., : lq - lk, :] == 0)
    # Spot check the definition directly: the top-left row 0 attends key 0 only, so out = v[0].
    if causal != "bottom_right":
        np.testing.assert_allclose(out[..., 0, :], v[..., 0, :], **F64)


def test_causal_false_equals_no_causal():
    rng = np.random.default_rng(3)
    q, k, v = make_qkv(rng, 4, 6, 3, batch=(1,), hq=1, dtype=np.float64)
    np.testing.assert_array_equal(reference.attention(q, k, v, causal=False), reference.attention(q, k, v))


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1), (6, 3), (3, 3)])
def test_gqa(hq, hkv):
    rng = np.random.default_rng(4000 + hq * 10 + hkv)
    q, k, v = make_qkv(rng, 3, 4, 3, 2, batch=(2,), hq=hq, hkv=hkv, dtype=np.float64)
    out, _ = check_reference(q, k, v)
    # Query head h uses kv head h // (hq // hkv): equal to running that head alone.
    for h in range(hq):
        hk = h // (hq // hkv)
        np.testing.assert_allclose(out[:, h], reference.attention(q[:, h], k[:, hk], v[:, hk]), **F64)


def test_bool_mask_with_fully_masked_rows():
    rng = np.random.default_rng(5)
    q, k, v = make_qkv(rng, 5, 4, 3, batch=(2,), hq=2, dtype=np.float64)
    mask = rng.random((2, 2, 5, 4)) < 0.6
    mask[0, 1, 2] = False  # a fully-masked row
    mask[1, :, 4] = False  # the same row in every head
    out, lse = check_reference(q, k, v, mask=mask)
    assert lse[0, 1, 2] == -np.inf and np.all(out[0, 1, 2] == 0)
    assert np.all(np.isneginf(lse[1, :, 4])) and np.all(out[1, :, 4] == 0)


def test_float_mask_with_neg_inf_rows():
    rng = np.random.default_rng(6)
    q, k, v = make_qkv(rng, 4, 5, 3, batch=(1,), hq=3, dtype=np.float64)
    mask = rng.standard_normal((3, 4, 5))
    mask[mask < -0.8] = -np.inf
    mask[2, 1] = -np.inf
    out, lse = check_reference(q, k, v, mask=mask)
    assert lse[0, 2, 1] == -np.inf and np.all(out[0, 2, 1] == 0)


def test_float_mask_in_float32_is_converted():
    rng = np.random.default_rng(7)
    q, k, v = make_qkv(rng, 4, 5, 3, batch=(1,), hq=2, dtype=np.float32)
    mask = rng.standard_normal((4, 5))  # float64 mask with float32 inputs
    check_reference(q, k, v, mask=mask)


@pytest.mark.parametrize("causal", [True, "bottom_right"])
def test_mask_combined_with_causal(causal):
    rng = np.random.default_rng(8)
    q, k, v = make_qkv(rng, 6, 4, 3, batch=(2,), hq=2, dtype=np.float64)
    mask = rng.random((1, 6, 4)) < 0.7
    check_reference(q, k, v, mask=mask, causal=causal)


def test_all_masked_and_empty_keys():
    rng = np.random.default_rng(9)
    q, k, v = make_qkv(rng, 3, 4, 2, batch=(1,), hq=1, dtype=np.float64)
    out, lse = check_reference(q, k, v, mask=np.zeros((3, 4), bool))
    assert np.all(out == 0) and np.all(np.isneginf(lse))
    q, k, v = make_qkv(rng, 3, 0, 2, 5, batch=(1,), hq=2, dtype=np.float64)
    out, lse = check_reference(q, k, v)
    assert out.shape == (1, 2, 3, 5) and np.all(out == 0) and np.all(np.isneginf(lse))
    q, k, v = make_qkv(rng, 0, 4, 2, batch=(1,), hq=2, dtype=np.float64)
    out, lse = check_reference(q, k, v)
    assert out.shape == (1, 2, 0, 2) and lse.shape == (1, 2, 0)


@pytest.mark.parametrize("rank", [2, 3])
def test_low_rank_inputs(rank):
    rng = np.random.default_rng(10 + rank)
    if rank == 2:
        q, k, v = make_qkv(rng, 4, 5, 3, 2, batch=(), hq=None, dtype=np.float64)
        mask = rng.random((4, 5)) < 0.7
    else:
        q, k, v = make_qkv(rng, 4, 5, 3, 2, batch=(2,), hq=None, dtype=np.float64)
        mask = rng.random((2, 4, 5)) < 0.7
    out, lse = check_reference(q, k, v, mask=mask, causal="bottom_right")
    assert out.shape == q.shape[:-1] + (2,) and lse.shape == q.shape[:-1]


def test_explicit_scale_and_lse_definition():
    rng = np.random.default_rng(11)
    q, k, v = make_qkv(rng, 3, 4, 5, batch=(1,), hq=1, dtype=np.float64)
    out, lse = check_reference(q, k, v, scale=0.37)
    s = (q @ np.swapaxes(k, -1, -2)) * 0.37
    np.testing.assert_allclose(lse, np.log(np.exp(s).sum(-1)), **F64)
    # scale 0: uniform weights, i.e. the mean of v over keys.
    out0 = reference.attention(q, k, v, scale=0.0)
    np.testing.assert_allclose(out0, np.broadcast_to(v.mean(-2, keepdims=True), out0.shape), **F64)


def test_nan_rows():
    rng = np.random.default_rng(12)
    q, k, v = make_qkv(rng, 4, 5, 3, batch=(1,), hq=1, dtype=np.float64)
    q[0, 0, 1, 2] = np.nan
    out, lse = check_reference(q, k, v)
    assert np.all(np.isnan(out[0, 0, 1])) and np.isnan(lse[0, 0, 1])
    assert np.all(np.isfinite(out[0, 0, [0, 2, 3]]))


def test_huge_scores_are_finite():
    rng = np.random.default_rng(13)
    q, k, v = make_qkv(rng, 4, 6, 8, batch=(1,), hq=2, dtype=np.float64, scale=60.0)
    out, lse = check_reference(q, k, v, scale=1.0)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse)) and np.abs(lse).max() > 1e3


def test_out_parameter_and_strided_inputs():
    rng = np.random.default_rng(14)
    q, k, v = make_qkv(rng, 4, 5, 3, batch=(2,), hq=2, dtype=np.float32)
    qt = np.ascontiguousarray(np.swapaxes(q, 1, 2)).swapaxes(1, 2)  # (B, L, H, D) storage
    out = np.empty((2, 2, 4, 3), np.float32)
    res = reference.attention(qt, k[..., ::-1, :], v[..., ::-1, :], out=out)
    assert res is out
    np.testing.assert_allclose(out, brute_force(q, k[..., ::-1, :], v[..., ::-1, :])[0], **F32)


def test_mask_rank_lower_than_scores():
    rng = np.random.default_rng(15)
    q, k, v = make_qkv(rng, 3, 4, 2, batch=(2,), hq=3, dtype=np.float64)
    for shape in [(4,), (3, 1), (3, 1, 1), (2, 1, 1, 4), ()]:
        mask = rng.random(shape) < 0.8 if shape else np.bool_(True)
        check_reference(q, k, v, mask=mask)
    check_reference(q, k, v, mask=randn(rng, (3, 1), np.float64))
