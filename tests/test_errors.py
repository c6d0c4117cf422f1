"""Every user error: the exception type, and a message that names the offending argument.

Each case runs against fusedattn.attention: the reference takes valid inputs only (issue #14), the
public function validates before it computes or falls back to it.
"""
from __future__ import annotations

import numpy as np
import pytest

import fusedattn
from fusedattn import reference

# The reference takes valid inputs only (issue #14): errors are the public function's, which validates
# before computing. Without the extension these pass once the fallback is routed through validation.
IMPLS = [pytest.param(fusedattn.attention, id="kernel")]


def _qkv(b=2, hq=4, hkv=2, lq=5, lk=7, d=8, dv=6, dtype=np.float32):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((b, hq, lq, d)).astype(dtype),
            rng.standard_normal((b, hkv, lk, d)).astype(dtype),
            rng.standard_normal((b, hkv, lk, dv)).astype(dtype))


def _replace(which, value, **kwargs):
    q, k, v = _qkv(**kwargs)
    args = {"q": q, "k": k, "v": v}
    args[which] = value(args[which]) if callable(value) else value
    return args["q"], args["k"], args["v"]


# (id, (q, k, v), kwargs, exception, regex the message must match)
CASES = [
    # rank
    ("q_1d", _replace("q", np.zeros(8, np.float32)), {}, ValueError, r"\bq\b.*dimensions"),
    ("k_1d", _replace("k", np.zeros(8, np.float32)), {}, ValueError, r"\bk\b.*dimensions"),
    ("v_1d", _replace("v", np.zeros(6, np.float32)), {}, ValueError, r"\bv\b.*dimensions"),
    ("q_0d", _replace("q", np.float32(1.0)), {}, ValueError, r"\bq\b"),
    ("rank_mismatch", _replace("k", lambda k: k[0]), {}, ValueError, r"number of dimensions"),
    # dtypes
    ("q_int", _replace("q", lambda q: q.astype(np.int32)), {}, TypeError, r"\bq\b.*int32"),
    ("k_float16", _replace("k", lambda k: k.astype(np.float16)), {}, TypeError, r"\bk\b.*float16"),
    ("v_complex", _replace("v", lambda v: v.astype(np.complex64)), {}, TypeError, r"\bv\b.*complex64"),
    ("q_bool", _replace("q", lambda q: q > 0), {}, TypeError, r"\bq\b.*bool"),
    ("q_object_list", _replace("q", [[1.0, 2.0], [3.0]]), {}, TypeError, r"\bq\b"),
    ("q_str", _replace("q", "hello"), {}, TypeError, r"\bq\b"),
    ("mixed_q32_k64", _replace("k", lambda k: k.astype(np.float64)), {}, TypeError, r"q float32.*k float64"),
    ("mixed_v64", _replace("v", lambda v: v.astype(np.float64)), {}, TypeError, r"float32.*v float64"),
    # shapes
    ("kv_length_mismatch", _replace("v", lambda v: v[:, :, :-1]), {}, ValueError, r"\bk\b and \bv\b"),
    ("kv_heads_mismatch", _replace("v", lambda v: v[:, :1]), {}, ValueError, r"\bk\b and \bv\b"),
    ("qk_head_dim_mismatch", _replace("k", lambda k: k[..., :-1]), {}, ValueError, r"\bq\b and \bk\b.*head dim D"),
    ("head_dim_513", _qkv(d=513, dv=4), {}, ValueError, r"D \(last axis of q and k\).*512.*513"),
    ("value_dim_513", _qkv(d=4, dv=513), {}, ValueError, r"Dv \(last axis of v\).*512.*513"),
    ("head_dim_0", _qkv(d=0, dv=4), {}, ValueError, r"\bD\b.*between 1 and 512"),
    ("value_dim_0", _qkv(d=4, dv=0), {}, ValueError, r"\bDv\b.*between 1 and 512"),
    ("batch_mismatch", _replace("q", lambda q: np.concatenate([q, q[:1]])), {}, ValueError,
     r"\bq\b and \bk\b.*leading \(batch\)"),
    ("batch_mismatch_3d", (np.zeros((3, 5, 8)), np.zeros((2, 7, 8)), np.zeros((2, 7, 8))), {}, ValueError,
     r"leading \(batch\)"),
    ("heads_not_multiple", _qkv(hq=3, hkv=2), {}, ValueError, r"Hq=3.*Hkv=2"),
    ("hkv_greater_than_hq", _qkv(hq=2, hkv=4), {}, ValueError, r"Hq=2.*Hkv=4"),
    ("hkv_zero", _qkv(hq=2, hkv=0), {}, ValueError, r"Hkv=0"),
    # mask
    ("mask_int", _qkv(), {"mask": np.ones((5, 7), np.int64)}, TypeError, r"\bmask\b.*int64"),
    ("mask_wrong_lk", _qkv(), {"mask": np.ones((5, 6), bool)}, ValueError, r"\bmask\b.*\(5, 6\).*broadcastable"),
    ("mask_wrong_lq", _qkv(), {"mask": np.ones((4, 7), bool)}, ValueError, r"\bmask\b.*broadcastable"),
    ("mask_wrong_heads", _qkv(), {"mask": np.ones((3, 1, 1), bool)}, ValueError, r"\bmask\b.*broadcastable"),
    ("mask_too_many_dims", _qkv(), {"mask": np.ones((2, 2, 4, 5, 7), bool)}, ValueError, r"\bmask\b.*broadcastable"),
    ("mask_float_wrong_shape", _qkv(), {"mask": np.zeros((7, 5), np.float32)}, ValueError, r"\bmask\b"),
    # causal
    ("causal_bogus", _qkv(), {"causal": "bogus"}, ValueError, r"\bcausal\b.*'bogus'"),
    ("causal_typo", _qkv(), {"causal": "bottom-right"}, ValueError, r"\bcausal\b.*bottom_right"),
    ("causal_float", _qkv(), {"causal": 0.5}, ValueError, r"\bcausal\b"),
    ("causal_none", _qkv(), {"causal": None}, ValueError, r"\bcausal\b"),
    # scale
    ("scale_str", _qkv(), {"scale": "0.5"}, TypeError, r"\bscale\b"),
    ("scale_bool", _qkv(), {"scale": True}, TypeError, r"\bscale\b"),
    ("scale_inf", _qkv(), {"scale": float("inf")}, ValueError, r"\bscale\b.*finite"),
    ("scale_nan", _qkv(), {"scale": float("nan")}, ValueError, r"\bscale\b.*finite"),
    # num_threads
    ("num_threads_0", _qkv(), {"num_threads": 0}, ValueError, r"\bnum_threads\b.*>= 1.*0"),
    ("num_threads_negative", _qkv(), {"num_threads": -3}, ValueError, r"\bnum_threads\b.*-3"),
    ("num_threads_float", _qkv(), {"num_threads": 2.0}, TypeError, r"\bnum_threads\b"),
    ("num_threads_str", _qkv(), {"num_threads": "2"}, TypeError, r"\bnum_threads\b"),
    ("num_threads_bool", _qkv(), {"num_threads": True}, TypeError, r"\bnum_threads\b"),
    # out
    ("out_wrong_shape", _qkv(), {"out": np.empty((2, 4, 5, 8), np.float32)}, ValueError, r"\bout\b.*shape.*\(2, 4, 5, 6\)"),
    ("out_wrong_rank", _qkv(), {"out": np.empty((4, 5, 6), np.float32)}, ValueError, r"\bout\b.*shape"),
    ("out_wrong_dtype", _qkv(), {"out": np.empty((2, 4, 5, 6), np.float64)}, TypeError, r"\bout\b.*float32.*float64"),
    ("out_not_array", _qkv(), {"out": [[0.0]]}, TypeError, r"\bout\b.*ndarray"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("qkv,kwargs,exc,match", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_error(impl, qkv, kwargs, exc, match):
    q, k, v = qkv
    with pytest.raises(exc, match=match):
        impl(q, k, v, **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_read_only(impl):
    q, k, v = _qkv()
    out = np.empty((2, 4, 5, 6), np.float32)
    out.setflags(write=False)
    with pytest.raises(ValueError, match=r"\bout\b.*writeable"):
        impl(q, k, v, out=out)
    # A broadcast view is read-only too.
    with pytest.raises(ValueError, match=r"\bout\b.*writeable"):
        impl(q, k, v, out=np.broadcast_to(np.zeros(6, np.float32), (2, 4, 5, 6)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("target", ["q", "k", "v"])
def test_out_overlapping_input(impl, target):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 4, 6, 8)).astype(np.float32) for _ in range(3))
    arrays = {"q": q, "k": k, "v": v}
    before = {name: a.copy() for name, a in arrays.items()}
    with pytest.raises(ValueError, match=rf"\bout\b.*overlap.*\b{target}\b"):
        impl(q, k, v, out=arrays[target])
    # Partial overlap: out is a view sharing some, not all, memory with the input.
    buf = rng.standard_normal((2, 4, 12, 8)).astype(np.float32)
    arrays[target] = buf[:, :, :6]
    with pytest.raises(ValueError, match=rf"\bout\b.*overlap.*\b{target}\b"):
        impl(arrays["q"], arrays["k"], arrays["v"], out=buf[:, :, 3:9])
    for name in ("q", "k", "v"):
        if name != target:
            np.testing.assert_array_equal(arrays[name], before[name])  # nothing was written


@pytest.mark.parametrize("impl", IMPLS)
def test_out_overlapping_mask(impl):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 4, 6, 8)).astype(np.float32) for _ in range(3))
    buf = np.zeros((2, 4, 6, 8), np.float32)  # the float mask (Lk = 6) and out (Dv = 8) share memory
    with pytest.raises(ValueError, match=r"\bout\b.*overlap.*\bmask\b"):
        impl(q, k, v, mask=buf[..., :6], out=buf)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_disjoint_views_of_one_buffer_are_fine(impl):
    # Not an error: out and the inputs are disjoint parts of one allocation.
    rng = np.random.default_rng(3)
    buf = rng.standard_normal((4, 2, 6, 8)).astype(np.float32)
    q, k, v, out = buf[0], buf[1], buf[2], buf[3]
    res = impl(q, k, v, out=out)
    assert res is out
    np.testing.assert_allclose(out, reference.attention(q.copy(), k.copy(), v.copy()), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_errors_leave_out_untouched(impl):
    q, k, v = _qkv()
    out = np.full((2, 4, 5, 6), 3.0, np.float32)
    with pytest.raises(ValueError):
        impl(q, k, v, out=out, causal="sideways")
    with pytest.raises(ValueError):
        impl(q, k, v, out=out, mask=np.ones((5, 3), bool))
    assert np.all(out == 3.0)


def test_set_num_threads_errors():
    before = fusedattn.get_num_threads()
    with pytest.raises(ValueError, match=r"\bnum_threads\b"):
        fusedattn.set_num_threads(0)
    with pytest.raises(TypeError, match=r"\bnum_threads\b"):
        fusedattn.set_num_threads(1.5)
    assert fusedattn.get_num_threads() == before


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_additive_refuses_block_diagonal(backward):
    """The packed kernels score by dot products: additive scores over a BlockDiagonal mask are refused by
    name (they used to return a result computed with no mask)."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((n, 8)).astype(np.float32) for n in (5, 7, 7))
    mask = fusedattn.masks.BlockDiagonal([2, 3], [3, 4])
    with pytest.raises(ValueError, match="BlockDiagonal.*dot-product attention only"):
        if backward:
            fusedattn.additive_attention_backward(q, q, k, v, q, np.zeros(5, np.float32), mask=mask)
        else:
            fusedattn.additive_attention(q, k, v, mask=mask)
