"""The oracle itself: fusedattn.reference against an independent brute-force implementation.

The brute force below shares no code with the reference (nor with fusedattn._checks): explicit
Python loops over every (batch, head, query) row and every key, ``math.fsum`` and ``math.exp``.
It is slow, so shapes here are tiny.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import make_qkv, numeric_gradients, randn
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


# ---------------------------------------------------------------------------------------------
# The oracle stands alone (issue #14)
# ---------------------------------------------------------------------------------------------

def test_reference_imports_only_numpy_and_the_standard_library():
    # The oracle must not share code (nor a mistake) with the API it checks: no relative import, no
    # fusedattn module, nothing beyond NumPy and the standard library (ml_dtypes neither: bfloat16 by name).
    import ast
    import pathlib
    import sys


    source = pathlib.Path(reference.__file__).read_text(encoding="utf-8")
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import from {'.' * node.level}{node.module or ''}"
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
    allowed = set(sys.stdlib_module_names) | {"numpy", "__future__"}
    assert roots <= allowed, roots - allowed


def test_dropout_hash_has_one_python_copy():
    from fusedattn import _checks

    assert _checks.dropout_keep_factor is reference.dropout_keep_factor


# ---------------------------------------------------------------------------------------------
# Attention sinks (issue #15)
# ---------------------------------------------------------------------------------------------

def _sink_as_extra_key(q, k, v, sinks, mask=None):
    """The same call without sinks: one extra key per kv head whose score is the sink (a zero key, the
    sink added by a float mask on its column) and whose value is zero."""
    hq, lq = q.shape[-3], q.shape[-2]
    k_ext = np.concatenate([k, np.zeros(k.shape[:-2] + (1, k.shape[-1]))], axis=-2)
    v_ext = np.concatenate([v, np.zeros(v.shape[:-2] + (1, v.shape[-1]))], axis=-2)
    base = np.zeros(q.shape[:-1] + (k.shape[-2],)) if mask is None else np.broadcast_to(mask, q.shape[:-1] + (k.shape[-2],))
    column = np.broadcast_to(np.asarray(sinks, np.float64).reshape(hq, 1, 1), q.shape[:-1] + (1,))
    return q, k_ext, v_ext, np.concatenate([base, column], axis=-1)


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (3, 1)])
@pytest.mark.parametrize("lq,lk", [(4, 6), (1, 1), (3, 0)])
def test_sinks_are_an_extra_key_with_zero_value(hq, hkv, lq, lk):
    rng = np.random.default_rng(100 + hq * 10 + lk)
    q, k, v = make_qkv(rng, lq, lk, 5, 3, batch=(2,), hq=hq, hkv=hkv, dtype=np.float64)
    sinks = rng.standard_normal(hq) * 2
    mask = rng.standard_normal((2, hq, lq, lk))
    mask[rng.random(mask.shape) < 0.3] = -np.inf
    if lq > 1:
        mask[0, 0, 1] = -np.inf  # a row that sees no key: out 0, lse = the sink
    out, lse = reference.attention(q, k, v, mask=mask, sinks=sinks, return_lse=True)
    want_out, want_lse = brute_force(*_sink_as_extra_key(q, k, v, sinks, mask)[:3], mask=_sink_as_extra_key(q, k, v, sinks, mask)[3])
    np.testing.assert_allclose(out, want_out, **F64)
    np.testing.assert_allclose(lse, want_lse, **F64)
    if lq > 1:
        assert np.all(out[0, 0, 1] == 0) and lse[0, 0, 1] == sinks[0]
    if lk == 0:
        assert np.all(out == 0) and np.array_equal(lse, np.broadcast_to(sinks[:, None], lse.shape))
    w = reference.attention_weights(q, k, mask=mask, sinks=sinks)
    np.testing.assert_allclose(w.sum(-1), 1 - np.exp(sinks[:, None] - lse), **F64)  # rows sum to < 1


VARIANTS = {
    "causal": dict(causal=True),
    "bottom_right_window": dict(causal="bottom_right", window=(2, None)),
    "window_alibi": dict(window=(1, 2), alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625])),
    "softcap_starts": dict(softcap=2.0, causal=True, q_start=3, k_start=1),
    "dropout": dict(dropout_p=0.3, seed=11),
    "batch_alibi_mask": dict(alibi_slopes=np.linspace(0.1, 0.8, 8).reshape(2, 4), mask=np.tri(5, 7, 1, bool)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sinks_compose_with_every_variant(variant):
    # From the definition: with lse0 the row's lse without the sink, the sink rescales the row's output by
    # e^lse0 / (e^sink + e^lse0) and its lse becomes logaddexp(lse0, sink); dropout (on the key
    # probabilities) and every bias only shape lse0.
    rng = np.random.default_rng(7)
    q, k, v = make_qkv(rng, 5, 7, 4, 3, batch=(2,), hq=4, hkv=2, dtype=np.float64)
    sinks = np.array([0.5, -1.0, 2.0, -np.inf])
    kwargs = VARIANTS[variant]
    out0, lse0 = reference.attention(q, k, v, return_lse=True, **kwargs)
    out, lse = reference.attention(q, k, v, sinks=sinks, return_lse=True, **kwargs)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(lse, np.logaddexp(lse0, sinks[:, None]), **F64)
        factor = np.where(np.isneginf(lse0), 0.0, np.exp(lse0 - lse))
    np.testing.assert_allclose(out, out0 * factor[..., None], **F64)


@pytest.mark.parametrize("kwargs", [dict(), dict(causal="bottom_right", softcap=3.0),
                                    dict(window=(1, 1), alibi_slopes=np.array([0.3, 0.6, 0.9]))],
                         ids=["plain", "causal_softcap", "window_alibi"])
def test_sink_gradients_match_finite_differences(kwargs):
    rng = np.random.default_rng(21)
    q, k, v = make_qkv(rng, 4, 3, 3, 2, batch=(2,), hq=3, hkv=1, dtype=np.float64)
    sinks = rng.standard_normal(3)
    r = rng.standard_normal((2, 3, 4, 2))
    out, lse = reference.attention(q, k, v, sinks=sinks, return_lse=True, **kwargs)
    grads = reference.attention_backward(r, q, k, v, out, lse, sinks=sinks, **kwargs)
    assert len(grads) == 4 and grads[3].shape == (3,) and grads[3].dtype == np.float64
    loss = lambda *x: float(np.sum(reference.attention(*x[:3], sinks=x[3], **kwargs) * r))  # noqa: E731
    for got, want in zip(grads, numeric_gradients(loss, (q, k, v, sinks), 1e-6)):
        np.testing.assert_allclose(got, want, atol=1e-7, rtol=1e-6)
    # Without sinks the backward keeps its three results.
    out, lse = reference.attention(q, k, v, return_lse=True, **kwargs)
    assert len(reference.attention_backward(r, q, k, v, out, lse, **kwargs)) == 3


def test_varlen_sinks_are_per_sequence_dense_calls():
    rng = np.random.default_rng(31)
    lens_q, lens_k = [2, 0, 3, 1], [4, 2, 0, 1]
    cu_q, cu_k = np.cumsum([0] + lens_q), np.cumsum([0] + lens_k)
    q = rng.standard_normal((cu_q[-1], 4, 3))
    k, v = rng.standard_normal((cu_k[-1], 2, 3)), rng.standard_normal((cu_k[-1], 2, 5))
    sinks = rng.standard_normal(4)
    out, lse = reference.attention_varlen(q, k, v, cu_q, cu_k, causal="bottom_right", sinks=sinks, return_lse=True)
    dout = rng.standard_normal(out.shape)
    grads = reference.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal="bottom_right",
                                                sinks=sinks)
    d_sinks = np.zeros(4)
    for b in range(4):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        dense = [x[rows].swapaxes(0, 1)[None] for x, rows in ((q, rq), (k, rk), (v, rk))]
        o, l = reference.attention(*dense, causal="bottom_right", sinks=sinks, return_lse=True)
        np.testing.assert_allclose(out[rq], o[0].swapaxes(0, 1), **F64)
        np.testing.assert_allclose(lse[:, rq], l[0], **F64)
        g = reference.attention_backward(dout[rq].swapaxes(0, 1)[None], *dense, o, l, causal="bottom_right",
                                         sinks=sinks)
        for got, want, rows in zip(grads, g, (rq, rk, rk)):
            np.testing.assert_allclose(got[rows], want[0].swapaxes(0, 1), **F64)
        d_sinks += g[3]
    np.testing.assert_allclose(grads[3], d_sinks, **F64)


def test_block_diagonal_backward_is_its_dense_mask():
    # Any object with cu_seqlens_q / cu_seqlens_k is a block-diagonal mask to the reference (duck typing:
    # it imports no masks module); its gradients are those of the materialised dense mask.
    from fusedattn.masks import BlockDiagonal

    rng = np.random.default_rng(41)
    mask = BlockDiagonal.from_seqlens([2, 3], [3, 1])
    q, k = rng.standard_normal((1, 2, 5, 4)), rng.standard_normal((1, 2, 4, 4))
    v = rng.standard_normal((1, 2, 4, 3))
    sinks = np.array([0.3, -0.7])
    out, lse = reference.attention(q, k, v, mask=mask.materialize(), sinks=sinks, return_lse=True)
    got_out, got_lse = reference.attention(q, k, v, mask=mask, sinks=sinks, return_lse=True)
    np.testing.assert_allclose(got_out, out, **F64)
    np.testing.assert_allclose(got_lse, lse, **F64)
    dout = rng.standard_normal(out.shape)
    want = reference.attention_backward(dout, q, k, v, out, lse, mask=mask.materialize(), sinks=sinks)
    got = reference.attention_backward(dout, q, k, v, out, lse, mask=mask, sinks=sinks)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **F64)


# ---------------------------------------------------------------------------------------------
# int8 K/V with per-token scales (issue #15)
# ---------------------------------------------------------------------------------------------

def _int8_with_scales(rng, shape):
    x8 = rng.integers(-127, 128, shape).astype(np.int8)
    scale = rng.uniform(0.001, 0.05, shape[:-1]).astype(np.float32)  # one per (..., head, token)
    return x8, scale


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch,hq,hkv", [((2,), 4, 2), ((), None, None), ((3,), None, None)],
                         ids=["gqa", "2d", "3d"])
def test_int8_kv_is_attention_on_dequantised_float64(dtype, batch, hq, hkv):
    rng = np.random.default_rng(51)
    q, _, _ = make_qkv(rng, 5, 6, 8, 3, batch=batch, hq=hq, hkv=hkv, dtype=dtype)
    kv_heads = () if hkv is None else (hkv,)
    k8, k_scale = _int8_with_scales(rng, batch + kv_heads + (6, 8))
    v8, v_scale = _int8_with_scales(rng, batch + kv_heads + (6, 3))
    kwargs = dict(causal="bottom_right", sinks=None if hq is None else np.full(hq, 0.5))
    out, lse = reference.attention(q, k8, v8, k_scale=k_scale, v_scale=v_scale, return_lse=True, **kwargs)
    k64 = k8.astype(np.float64) * k_scale.astype(np.float64)[..., None]
    v64 = v8.astype(np.float64) * v_scale.astype(np.float64)[..., None]
    want_out, want_lse = reference.attention(q.astype(np.float64), k64, v64, return_lse=True, **kwargs)
    assert out.dtype == dtype and lse.dtype == dtype  # q's dtype: int8 is storage only
    t = F64 if dtype == np.float64 else F32
    np.testing.assert_allclose(out, want_out, **t)
    np.testing.assert_allclose(lse, want_lse, **t)


# ---------------------------------------------------------------------------------------------
# Paged KV cache (issue #15)
# ---------------------------------------------------------------------------------------------

def _paged_setup(rng, seq_lens, block_size, *, hkv=2, d=4, dv=3, int8=False, spare_blocks=3):
    """A pool holding each sequence's tokens in shuffled blocks, the table, and the contiguous truth."""
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + spare_blocks
    order = rng.permutation(num_blocks)  # blocks of a sequence anywhere in the pool, in any order
    table = np.zeros((len(seq_lens), max(1, max(need)) + 1), np.int32)  # a spare column: unused entries
    table[:] = order[-1]
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = order[used:used + n]
        used += n
    if int8:
        k_cache, k_scale = _int8_with_scales(rng, (num_blocks, block_size, hkv, d))
        v_cache, v_scale = _int8_with_scales(rng, (num_blocks, block_size, hkv, dv))
    else:
        k_cache, v_cache = rng.standard_normal((num_blocks, block_size, hkv, d)), rng.standard_normal((num_blocks, block_size, hkv, dv))
        k_scale = v_scale = None

    def contiguous(b):  # token by token, as the layout is defined: cache[table[b, t // bs], t % bs]
        ks, vs = [], []
        for t in range(seq_lens[b]):
            blk, slot = table[b, t // block_size], t % block_size
            ks.append(k_cache[blk, slot].astype(np.float64) * (1 if k_scale is None else k_scale[blk, slot][:, None]))
            vs.append(v_cache[blk, slot].astype(np.float64) * (1 if v_scale is None else v_scale[blk, slot][:, None]))
        k = np.array(ks).reshape(seq_lens[b], hkv, d).swapaxes(0, 1)[None]
        v = np.array(vs).reshape(seq_lens[b], hkv, dv).swapaxes(0, 1)[None]
        return k, v

    return (k_cache, v_cache, table, np.array(seq_lens, np.int32)), dict(k_scale=k_scale, v_scale=v_scale), contiguous


PAGED_OPTIONS = {
    "default": dict(),
    "not_causal": dict(causal=False),
    "window_softcap": dict(window=(2, None), softcap=2.5),
    "alibi_per_sequence_sinks": "per_sequence",
}


@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("lq", [1, 3])
@pytest.mark.parametrize("option", list(PAGED_OPTIONS))
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_paged_is_contiguous_attention_per_sequence(block_size, lq, option, int8):
    rng = np.random.default_rng(61 + block_size + lq)
    seq_lens = [7, 0, 1, 2, 18]  # ragged, empty, shorter than the queries, longer than a block
    hq = 4
    (k_cache, v_cache, table, lengths), scales, contiguous = _paged_setup(rng, seq_lens, block_size, int8=int8)
    q = rng.standard_normal((len(seq_lens), hq, lq, 4)).astype(np.float32)
    kwargs = PAGED_OPTIONS[option]
    if kwargs == "per_sequence":
        kwargs = dict(alibi_slopes=rng.uniform(0.1, 1.0, (len(seq_lens), hq)), sinks=rng.standard_normal(hq))
    out, lse = reference.attention_paged(q, k_cache, v_cache, table, lengths, return_lse=True, **scales, **kwargs)
    assert out.shape == (5, hq, lq, 3) and lse.shape == (5, hq, lq)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    for b, n in enumerate(seq_lens):
        k, v = contiguous(b)
        position = n - lq + np.arange(lq)  # query i of sequence b sits at seq_lens[b] - Lq + i
        seen = np.arange(n)[None, :] <= position[:, None]
        dense = dict(kwargs)
        if "alibi_slopes" in dense:
            dense["alibi_slopes"] = dense["alibi_slopes"][b]
        causal = dense.pop("causal", "bottom_right")
        # Causality as an explicit mask of positions; window / ALiBi measure from the bottom-right diagonal,
        # which is what attention() uses without causal.
        want_out, want_lse = reference.attention(q[b:b + 1].astype(np.float64), k, v, return_lse=True,
                                                 mask=None if causal is False else seen, **dense)
        np.testing.assert_allclose(out[b], want_out[0], **F32)
        np.testing.assert_allclose(lse[b], want_lse[0], **F32)
        blind = position < 0 if causal is not False else np.full(lq, n == 0)
        assert np.all(out[b][:, blind] == 0)
        sink = np.broadcast_to(kwargs["sinks"][:, None], (hq, lq)) if "sinks" in kwargs else np.full((hq, lq), -np.inf)
        np.testing.assert_array_equal(lse[b][:, blind], sink[:, blind].astype(np.float32))


def test_paged_out_parameter():
    rng = np.random.default_rng(71)
    (k_cache, v_cache, table, lengths), _, _ = _paged_setup(rng, [3, 5], 2)
    q = rng.standard_normal((2, 2, 1, 4))
    buf = np.empty((2, 2, 1, 3))
    assert reference.attention_paged(q, k_cache, v_cache, table, lengths, out=buf) is buf
    np.testing.assert_array_equal(buf, reference.attention_paged(q, k_cache, v_cache, table, lengths))
