"""fusedattn.additive_attention against the float64 reference and against Keras's formula, on every ISA."""
import math

import numpy as np
import pytest

import fusedattn
from fusedattn import reference

from conftest import make_qkv, randn


def additive_tol(dtype, weight):
    """Tolerance for additive scores.

    Each score is sum_d w_d tanh(q_d + k_d): the kernel's tanh is accurate to about one ulp *of 1*
    (it is (e - 1) / (e + 1)), so a score carries an absolute error of about eps * sum|w_d|, which the
    softmax passes on to the output as a relative error of the same size. float32: 2e-6 * (10 + sum|w|)
    is ~15x the errors measured (1e-5 at D=128, sum|w| ~ 100) and far below what a wrong key, mask or
    weight causes (>= 1e-3). float64: the same argument with eps64.
    """
    spread = 10.0 + float(np.abs(weight).sum())
    rel = 2e-6 if np.dtype(dtype) == np.float32 else 1e-14
    return dict(rtol=rel * spread, atol=rel * spread)


def keras_additive_attention(q, k, v, w, *, key_mask=None, causal=False):
    """Keras AdditiveAttention for one (Lq, D) / (Lk, D) / (Lk, Dv) sequence, written out by hand in float64:
    scores[i, j] = sum_d scale_d * tanh(q[i, d] + k[j, d]); softmax over j after masking; @ v."""
    lq, lk = q.shape[0], k.shape[0]
    out = np.zeros((lq, v.shape[1]))
    for i in range(lq):
        scores = []
        for j in range(lk):
            allowed = (key_mask is None or key_mask[j]) and (not causal or j <= i)
            s = sum(float(w[d]) * math.tanh(float(q[i, d]) + float(k[j, d])) for d in range(q.shape[1]))
            scores.append(s if allowed else -math.inf)
        top = max(scores)
        e = [math.exp(s - top) for s in scores]
        total = math.fsum(e)
        for j in range(lk):
            out[i] += e[j] / total * v[j].astype(np.float64)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_keras_formula(isa, rng, dtype):
    q, k, v = make_qkv(rng, lq=6, lk=9, d=5, dv=3, batch=(), hq=None, dtype=dtype)
    w = randn(rng, (5,), dtype)
    key_mask = np.array([True, True, False, True, True, True, False, True, True])
    for causal in (False, True):
        got = fusedattn.additive_attention(q, k, v, score_weight=w, mask=key_mask, causal=causal)
        want = keras_additive_attention(q, k, v, w, key_mask=key_mask, causal=causal)
        np.testing.assert_allclose(got, want, **additive_tol(dtype, w))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "lq, lk, d, dv, hq, hkv",
    [(1, 1, 8, 8, 1, 1), (7, 777, 40, 80, 8, 2), (777, 7, 96, 16, 2, 1), (64, 65, 128, 128, 2, 2),
     (17, 130, 256, 8, 4, 4), (5, 33, 1, 3, 8, 1)],
)
def test_against_reference_shapes(isa, rng, dtype, lq, lk, d, dv, hq, hkv):
    q, k, v = make_qkv(rng, lq=lq, lk=lk, d=d, dv=dv, batch=(1,), hq=hq, hkv=hkv, dtype=dtype)
    w = randn(rng, (d,), dtype)
    out, lse = fusedattn.additive_attention(q, k, v, score_weight=w, return_lse=True)
    ref_out, ref_lse = reference.additive_attention(q, k, v, score_weight=w, return_lse=True)
    assert out.dtype == np.dtype(dtype) and out.shape == (1, hq, lq, dv)
    np.testing.assert_allclose(out, ref_out, **additive_tol(dtype, w))
    np.testing.assert_allclose(lse, ref_lse, **additive_tol(dtype, w))


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_masks_and_causal(isa, rng, causal, mask_kind):
    q, k, v = make_qkv(rng, lq=37, lk=70, d=24, batch=(2,), hq=4, hkv=2)
    mask = None
    if mask_kind == "bool":
        mask = rng.random((4, 37, 70)) > 0.3
    elif mask_kind == "float":
        mask = randn(rng, (37, 70))
    w = randn(rng, (24,))
    out, lse = fusedattn.additive_attention(q, k, v, score_weight=w, mask=mask, causal=causal, return_lse=True)
    ref_out, ref_lse = reference.additive_attention(q, k, v, score_weight=w, mask=mask, causal=causal, return_lse=True)
    np.testing.assert_allclose(out, ref_out, **additive_tol(np.float32, w))
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], **additive_tol(np.float32, w))


def test_default_weight_is_ones_and_strided_inputs(isa, rng):
    base_q, base_k, v = make_qkv(rng, lq=20, lk=30, d=16, batch=(2,), hq=2)
    q = np.swapaxes(np.ascontiguousarray(np.swapaxes(base_q, 1, 2)), 1, 2)  # (B, L, H, D) layout viewed as (B, H, L, D)
    k = base_k[..., ::-1, :]
    out = fusedattn.additive_attention(q, k, v)
    ref = reference.additive_attention(q, k, v, score_weight=np.ones(16))
    np.testing.assert_allclose(out, ref, **additive_tol(np.float32, np.ones(16)))


def test_fully_masked_rows_and_out(isa, rng):
    q, k, v = make_qkv(rng, lq=4, lk=6, d=8, batch=(), hq=None)
    mask = np.ones((4, 6), bool)
    mask[2] = False
    out = np.empty((4, 8), np.float32)
    result, lse = fusedattn.additive_attention(q, k, v, mask=mask, out=out, return_lse=True)
    assert result is out
    assert np.all(out[2] == 0) and np.isneginf(lse[2])
    np.testing.assert_allclose(out, reference.additive_attention(q, k, v, mask=mask), **additive_tol(np.float32, np.ones(8)))


def test_large_arguments_saturate_tanh(isa, rng):
    # tanh must saturate to +-1 rather than overflow to NaN when q + k is huge.
    q, k, v = make_qkv(rng, lq=5, lk=7, d=8, batch=(), hq=None, scale=1e4)
    out = fusedattn.additive_attention(q, k, v)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, reference.additive_attention(q, k, v), **additive_tol(np.float32, np.ones(8)))


# The reference takes valid inputs only (issue #14): errors are the public function's, which validates
# before computing. Without the extension these pass once the fallback is routed through validation.
@pytest.mark.parametrize("fn", [fusedattn.additive_attention])
def test_score_weight_errors(fn):
    q = k = v = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"score_weight.*\(4,\)"):
        fn(q, k, v, score_weight=np.ones(5, np.float32))
    with pytest.raises(TypeError, match="score_weight"):
        fn(q, k, v, score_weight=np.ones(4, complex))
