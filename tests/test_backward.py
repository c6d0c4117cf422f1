"""Gradient oracles of the fused backward pass (issue 5).

``attention_backward`` / ``attention_vjp`` / ``additive_attention_backward`` are judged against:

* central finite differences of the float64 reference forward (every input element, and the additive
  score weight), on small shapes: the definition of a gradient, independent of any backward formula
  (also through soft-capping, sliding windows and ALiBi with position offsets);
* ``torch.autograd`` through ``scaled_dot_product_attention``, in float32 and float64, across masks,
  causal alignments, grouped-query attention, odd shapes, 2-D / 3-D and strided inputs, on every ISA;
* the float64 reference backward (``fusedattn.reference``), which recomputes the probabilities
  from q, k and v and so shares nothing with the kernel but the formula;

plus bit-for-bit determinism across thread counts, and the argument checks of dout / out / lse.
Rows that may attend no key must get finite gradients and dq exactly 0; keys no query sees, dk = dv = 0.

Every comparison of gradients is relative to the largest magnitude of the expected tensor (see
:func:`relative_error`): gradients are sums of many terms of both signs (``dS = P * (dP - Delta)``
cancels by construction), so individual elements can be far smaller than the rounding error of the
terms that produced them, and an element-wise rtol would demand more than any float implementation
(torch included) can deliver.
"""
from __future__ import annotations

import numpy as np
import pytest

import fusedattn
from fusedattn import reference

from conftest import make_qkv, numeric_gradients, randn

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]


def relative_error(got, want, floor=1.0):
    """``max|got - want| / max(max|want|, floor)`` in float64 (0 for empty arrays).

    The floor matters where the true gradient vanishes identically: with a single key the softmax is
    the constant 1, so dq = dk = 0 exactly, and an implementation may return rounding noise of size
    eps * |dP| there (the cancellation dP - Delta; the SIMD paths do, torch and the scalar path happen
    to give 0). Inputs and dout are standard normal, so the natural magnitude of every gradient here
    is O(1); a floor of 1 measures such noise on that scale.
    """
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if want.size == 0:
        return 0.0
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), floor))


def assert_grads_close(got, want, tol, names=("dq", "dk", "dv"), dtype=None):
    """Each gradient in ``got`` has the expected shape and dtype, is finite, and is within ``tol``."""
    assert len(got) == len(want) == len(names)
    for name, g, w in zip(names, got, want):
        assert isinstance(g, np.ndarray), name
        assert g.shape == np.shape(w), f"{name}: shape {g.shape} != {np.shape(w)}"
        if dtype is not None:
            assert g.dtype == dtype, f"{name}: dtype {g.dtype} != {np.dtype(dtype)}"
        assert np.isfinite(g).all(), f"{name}: non-finite gradient"
        err = relative_error(g, w)
        assert err <= tol, f"{name}: max error {err:.3g} x max|expected| exceeds {tol:.1g}"


# ---------------------------------------------------------------------------------------------
# Finite differences (float64)
# ---------------------------------------------------------------------------------------------

# Central differences: dL/dx ~ (L(x + h) - L(x - h)) / 2h with error h^2/6 * |L'''| (truncation) plus
# ~eps * sum|terms of L| / h (the rounding of the two forward evaluations, amplified by 1/h). With
# eps64 = 1.1e-16, O(1) inputs and |L| = |sum(out * R)| ~ 10, the two balance near h ~ (eps)^(1/3) ~ 5e-6;
# h = 1e-5 gives truncation ~2e-11 * |L'''| and rounding ~1e-10. Measured: at most ~2e-10 relative to
# max|grad| (dot) and ~1e-10 (additive), so FD_TOL = 1e-8 keeps ~50x headroom while any real error (a
# wrong sign, a missing term, a mis-scaled group sum: >= 1e-3) fails.
FD_STEP = 1e-5
FD_TOL = 1e-8


def bool_mask_with_dead_row_and_key(rng, shape):
    """A random bool mask (True = may attend) with one row that sees nothing and one key nobody sees."""
    mask = rng.random(shape) < 0.7
    mask[..., 1, :] = False  # a fully masked query row: out 0, lse -inf, no gradient
    mask[..., :, 2] = False  # a key no query may see: dk = dv = 0 for it
    return mask


# (name, make_qkv kwargs, attention kwargs builder). Each covers one feature of the backward pass.
FD_CASES = {
    "plain": (dict(lq=5, lk=7, d=6, dv=3, batch=(1,), hq=2), lambda rng: {}),
    "scale": (dict(lq=4, lk=6, d=5, dv=5, batch=(1,), hq=1), lambda rng: {"scale": 0.7}),
    "causal_top_left": (dict(lq=7, lk=5, d=4, dv=3, batch=(1,), hq=2), lambda rng: {"causal": True}),
    # Lq > Lk bottom-right: the first Lq - Lk = 3 rows see no key at all.
    "bottom_right_dead_rows": (dict(lq=7, lk=4, d=4, dv=3, batch=(1,), hq=1), lambda rng: {"causal": "bottom_right"}),
    "bool_mask": (dict(lq=5, lk=6, d=4, dv=3, batch=(1,), hq=2),
                  lambda rng: {"mask": bool_mask_with_dead_row_and_key(rng, (1, 2, 5, 6))}),
    # A float mask is a constant added to the scores (no gradient of its own); -inf entries forbid.
    "float_mask": (dict(lq=5, lk=6, d=4, dv=3, batch=(1,), hq=2),
                   lambda rng: {"mask": np.where(rng.random((5, 6)) < 0.2, -np.inf, rng.standard_normal((5, 6)))}),
    "gqa": (dict(lq=4, lk=5, d=4, dv=3, batch=(1,), hq=4, hkv=2), lambda rng: {"causal": "bottom_right"}),
    "mqa_2batch": (dict(lq=3, lk=4, d=3, dv=2, batch=(2,), hq=3, hkv=1), lambda rng: {}),
    "2d": (dict(lq=5, lk=6, d=4, dv=3, batch=(), hq=None), lambda rng: {"causal": True}),
    "3d": (dict(lq=4, lk=5, d=3, dv=4, batch=(2,), hq=None), lambda rng: {}),
    # The position model: soft-capping is differentiated through (c * tanh(s / c)); windows and ALiBi
    # slopes are constants that shape the scores, checked here through the gradients they leave.
    "softcap": (dict(lq=5, lk=6, d=4, dv=3, batch=(1,), hq=2), lambda rng: {"softcap": 2.0}),
    "sliding_window": (dict(lq=6, lk=6, d=4, dv=3, batch=(1,), hq=1),
                       lambda rng: {"causal": True, "window": (2, None)}),
    "alibi_offsets": (dict(lq=4, lk=7, d=4, dv=3, batch=(1,), hq=2),
                      lambda rng: {"causal": "bottom_right", "alibi_slopes": np.array([0.5, 0.25]), "q_start": 3,
                                   "k_start": 1}),
}


@pytest.mark.parametrize("case", list(FD_CASES))
def test_attention_backward_matches_finite_differences(isa, rng, case):
    shapes, make_kwargs = FD_CASES[case]
    q, k, v = make_qkv(rng, dtype=np.float64, **shapes)
    kwargs = make_kwargs(rng)
    out, lse = fusedattn.attention(q, k, v, return_lse=True, **kwargs)
    r = randn(rng, out.shape, np.float64)  # loss = sum(out * R): dL/dout = R, a generic direction

    def loss(q_, k_, v_):
        return float(np.sum(reference.attention(q_, k_, v_, **kwargs) * r))

    got = fusedattn.attention_backward(r, q, k, v, out, lse, **kwargs)
    assert_grads_close(got, numeric_gradients(loss, (q, k, v), FD_STEP), FD_TOL, dtype=np.float64)


ADDITIVE_FD_CASES = {
    "plain": (dict(lq=4, lk=5, d=4, dv=3, batch=(1,), hq=2), lambda rng: {}),
    "causal_gqa": (dict(lq=5, lk=4, d=3, dv=2, batch=(1,), hq=4, hkv=2), lambda rng: {"causal": True}),
    "bool_mask": (dict(lq=5, lk=6, d=4, dv=3, batch=(1,), hq=1),
                  lambda rng: {"mask": bool_mask_with_dead_row_and_key(rng, (5, 6))}),
    "float_mask_2d": (dict(lq=4, lk=5, d=3, dv=3, batch=(), hq=None),
                      lambda rng: {"mask": np.where(rng.random((4, 5)) < 0.2, -np.inf, rng.standard_normal((4, 5)))}),
    "softcap_window": (dict(lq=5, lk=6, d=3, dv=2, batch=(1,), hq=1), lambda rng: {"softcap": 1.5, "window": (2, 1)}),
}


@pytest.mark.parametrize("case", list(ADDITIVE_FD_CASES))
def test_additive_backward_matches_finite_differences(isa, rng, case):
    shapes, make_kwargs = ADDITIVE_FD_CASES[case]
    q, k, v = make_qkv(rng, dtype=np.float64, **shapes)
    w = randn(rng, (q.shape[-1],), np.float64)
    kwargs = make_kwargs(rng)
    out, lse = fusedattn.additive_attention(q, k, v, score_weight=w, return_lse=True, **kwargs)
    r = randn(rng, out.shape, np.float64)

    def loss(q_, k_, v_, w_):
        return float(np.sum(reference.additive_attention(q_, k_, v_, score_weight=w_, **kwargs) * r))

    got = fusedattn.additive_attention_backward(r, q, k, v, out, lse, score_weight=w, **kwargs)
    assert_grads_close(got, numeric_gradients(loss, (q, k, v, w), FD_STEP), FD_TOL,
                       names=("dq", "dk", "dv", "dscore_weight"), dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Against the float64 reference backward (runs without torch)
# ---------------------------------------------------------------------------------------------

# float32 gradients accumulate over Lq (dk, dv, times the group size for GQA) and Lk (dq) with float32
# rounding, and dq / dk inherit the cancellation in dP - Delta: measured up to ~1.2e-6 of max|grad| against
# the float64 truth at these sizes (torch's own float32 autograd: ~0.9e-6), and ~2.3e-6 where the true
# dq = dk = 0 (a single key: rounding noise of size eps * |dP| on the SIMD paths, see relative_error).
# 2e-5 (conftest's float32 tolerance) keeps ~10x headroom; a wrong tile, mask or group sum moves
# gradients by >= 1e-3 of their maximum. float64: the same argument, ~3e-15 measured, 1e-12.
GRAD_TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_attention_backward_matches_reference(isa, rng, dtype, causal):
    q, k, v = make_qkv(rng, 70, 90, 40, 24, batch=(2,), hq=4, hkv=2, dtype=dtype)
    out, lse = fusedattn.attention(q, k, v, causal=causal, return_lse=True)
    dout = randn(rng, out.shape, dtype)
    got = fusedattn.attention_backward(dout, q, k, v, out, lse, causal=causal)
    want = reference.attention_backward(dout.astype(np.float64), *(x.astype(np.float64) for x in (q, k, v)),
                                        out.astype(np.float64), lse.astype(np.float64), causal=causal)
    assert_grads_close(got, want, GRAD_TOL[np.dtype(dtype)], dtype=dtype)


def additive_grad_tol(dtype, weight):
    """Tolerance (relative to max|grad|) of the additive backward in ``dtype``.

    The kernel's tanh is accurate to ~1 ulp of 1, so each score carries an absolute error of about
    eps * sum|w_d| (as in test_additive.additive_tol), which the softmax turns into relative errors of the
    probabilities of that size; the gradients then accumulate them. dscore_weight is the hardest: it sums
    Hq * Lq * Lk terms dS_ij * t_ijd whose total cancels (sum_j dS_ij = 0 in every row), so its error
    relative to max|dw| grows with the number of terms. Measured in float32 at up to 96k terms (D = 32,
    sum|w| ~ 25): the kernel ~3.5e-6 of max|dw|, a naive float32 NumPy evaluation of the same formula
    ~1.4e-5. 1e-6 * (10 + sum|w|) admits that naive evaluation and leaves the kernel ~10x headroom; a
    wrong derivative (a missing 1 - t^2 or w_d, a mis-summed dw or GQA group) is O(1) of max|grad|.
    float64: the same with eps64 (1e-14, as in test_additive).
    """
    spread = 10.0 + float(np.abs(weight).sum())
    return (1e-6 if np.dtype(dtype) == np.float32 else 1e-14) * spread


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "lq, lk, d, dv, hq, hkv, kwargs",
    [(1, 1, 8, 8, 1, 1, {}),
     (7, 130, 40, 24, 4, 2, {}),
     (64, 7, 16, 40, 2, 1, {"causal": "bottom_right"}),
     (33, 47, 24, 8, 2, 2, {"causal": True, "mask": "bool"}),
     (20, 30, 12, 12, 3, 3, {"mask": "float"})],
    ids=["single", "gqa", "bottom_right_dead_rows", "causal_bool_mask", "float_mask"],
)
def test_additive_backward_matches_reference(isa, rng, dtype, lq, lk, d, dv, hq, hkv, kwargs):
    q, k, v = make_qkv(rng, lq, lk, d, dv, batch=(2,), hq=hq, hkv=hkv, dtype=dtype)
    w = randn(rng, (d,), dtype)
    kwargs = dict(kwargs)
    if kwargs.get("mask") == "bool":
        kwargs["mask"] = bool_mask_with_dead_row_and_key(rng, (2, 1, lq, lk))
    elif kwargs.get("mask") == "float":
        kwargs["mask"] = np.where(rng.random((lq, lk)) < 0.2, -np.inf, rng.standard_normal((lq, lk))).astype(dtype)
    out, lse = fusedattn.additive_attention(q, k, v, score_weight=w, return_lse=True, **kwargs)
    dout = randn(rng, out.shape, dtype)
    got = fusedattn.additive_attention_backward(dout, q, k, v, out, lse, score_weight=w, **kwargs)
    f64 = lambda x: x.astype(np.float64)  # noqa: E731
    want = reference.additive_attention_backward(f64(dout), f64(q), f64(k), f64(v), f64(out), f64(lse),
                                                 score_weight=f64(w), **kwargs)
    assert_grads_close(got, want, additive_grad_tol(dtype, w), names=("dq", "dk", "dv", "dscore_weight"), dtype=dtype)


def test_additive_default_weight_still_gets_a_gradient(rng):
    # score_weight=None means all ones; its gradient is still returned (a layer may train it later).
    q, k, v = make_qkv(rng, 6, 9, 5, 3, batch=(), hq=None, dtype=np.float64)
    out, lse = fusedattn.additive_attention(q, k, v, return_lse=True)
    dout = randn(rng, out.shape, np.float64)
    got = fusedattn.additive_attention_backward(dout, q, k, v, out, lse)
    want = fusedattn.additive_attention_backward(dout, q, k, v, out, lse, score_weight=np.ones(5))
    assert got[3].shape == (5,)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------------------------------
# Against torch.autograd through scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------

# Both sides round independently, each within the budget above: measured differences at most ~1.7e-6
# (float32) and ~3e-15 (float64) of max|grad| over this file's cases, so GRAD_TOL applies to torch too.
TORCH_TOL = GRAD_TOL


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is not installed (optional: pip install torch==2.13.0)")


def torch_grads(torch, q, k, v, dout, *, attn_mask=None, **kwargs):
    """(out, dq, dk, dv) of torch's SDPA via autograd, on tensors viewing the same (strided) buffers.

    A float ``attn_mask`` is passed as a tensor without ``requires_grad``: fusedattn treats masks as
    constants and returns no gradient for them, so torch is not asked for one either.
    """
    leaves = [torch.from_numpy(x).requires_grad_(True) for x in (q, k, v)]
    if attn_mask is not None:
        attn_mask = torch.from_numpy(np.asarray(attn_mask))
    out = torch.nn.functional.scaled_dot_product_attention(*leaves, attn_mask=attn_mask, **kwargs)
    out.backward(torch.from_numpy(dout))
    return (out.detach().numpy(),) + tuple(t.grad.numpy() for t in leaves)


def live_rows(q, k, v, **kwargs):
    """Bool of q.shape[:-1]: the query rows that may attend at least one key (from the float64 reference)."""
    _, lse = reference.attention(q, k, v, return_lse=True, **kwargs)
    return ~np.isneginf(lse)


def check_against_torch(torch, q, k, v, *, dout=None, rng=None, ours=None, theirs=None):
    """Run both forward + backward passes and compare out, dq (on rows that attend something), dk, dv.

    ``ours`` / ``theirs`` are the keyword arguments of fusedattn.attention and torch's SDPA. Rows that may
    attend no key must give dq exactly 0 on our side (and every gradient must be finite): torch's values
    there are a convention of its own, so such rows are left out of the comparison.
    """
    ours, theirs = ours or {}, theirs or {}
    dtype = q.dtype
    out, backward = fusedattn.attention_vjp(q, k, v, **ours)
    if dout is None:
        dout = randn(rng, out.shape, dtype)
    dq, dk, dv = backward(dout)
    t_out, t_dq, t_dk, t_dv = torch_grads(torch, q, k, v, dout, **theirs)
    tol = TORCH_TOL[np.dtype(dtype)]
    live = live_rows(q, k, v, **ours)
    assert np.all(dq[~live] == 0), "a row that attends nothing must get dq exactly 0"
    assert relative_error(out, t_out) <= tol, "forward outputs differ"
    assert_grads_close((dq[live], dk, dv), (t_dq[live], t_dk, t_dv), tol, dtype=dtype)
    return dq, dk, dv


# Every Lq and Lk in {1, 7, 64, 130} and every D in {8, 40, 64, 96, 128} appears, each with Dv != D:
# 1 and 7 are below one SIMD register of queries, 64 exactly one tile, 130 two tiles and a 2-row tail.
ODD_SHAPES = [(1, 1, 8, 16), (1, 130, 40, 24), (7, 64, 96, 40), (64, 7, 128, 8), (130, 130, 64, 96),
              (130, 7, 40, 64), (7, 1, 64, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lq, lk, d, dv", ODD_SHAPES, ids=["x".join(map(str, s)) for s in ODD_SHAPES])
def test_torch_odd_shapes(isa, rng, torch, dtype, lq, lk, d, dv):
    q, k, v = make_qkv(rng, lq, lk, d, dv, batch=(2,), hq=3, dtype=dtype)
    check_against_torch(torch, q, k, v, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_torch_scale(isa, rng, torch, dtype):
    q, k, v = make_qkv(rng, 37, 53, 32, 16, batch=(2,), hq=2, dtype=dtype)
    check_against_torch(torch, q, k, v, rng=rng, ours={"scale": 0.3}, theirs={"scale": 0.3})


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_torch_bool_mask(isa, rng, torch, dtype):
    # Broadcast over heads; one fully masked row and one key nobody sees.
    q, k, v = make_qkv(rng, 37, 53, 32, 24, batch=(2,), hq=4, dtype=dtype)
    mask = bool_mask_with_dead_row_and_key(rng, (2, 1, 37, 53))
    dq, dk, dv = check_against_torch(torch, q, k, v, rng=rng, ours={"mask": mask}, theirs={"attn_mask": mask})
    assert np.all(dk[..., 2, :] == 0) and np.all(dv[..., 2, :] == 0), "a key nobody sees must get no gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_torch_float_mask(isa, rng, torch, dtype):
    # Additive float mask with -inf entries and a fully -inf row. The mask is a constant on both sides:
    # fusedattn returns no gradient for it, and torch is given a tensor that does not require one.
    q, k, v = make_qkv(rng, 20, 33, 32, 16, batch=(2,), hq=4, dtype=dtype)
    mask = (rng.standard_normal((4, 20, 33)) * 2).astype(dtype)
    mask[rng.random(mask.shape) < 0.3] = -np.inf
    mask[1, 5] = -np.inf
    check_against_torch(torch, q, k, v, rng=rng, ours={"mask": mask}, theirs={"attn_mask": mask})


CAUSAL_CASES = [("top_left", 24, 24), ("top_left", 16, 40), ("top_left", 40, 16),
                ("bottom_right", 24, 24), ("bottom_right", 16, 40), ("bottom_right", 40, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode, lq, lk", CAUSAL_CASES, ids=[f"{m}-{a}x{b}" for m, a, b in CAUSAL_CASES])
def test_torch_causal(isa, rng, torch, dtype, mode, lq, lk):
    q, k, v = make_qkv(rng, lq, lk, 16, 24, batch=(1,), hq=2, dtype=dtype)
    if mode == "top_left":
        theirs = {"is_causal": True}  # torch's is_causal is top-left aligned
    else:
        # torch has no bottom-right is_causal: the equivalent explicit mask j <= i + Lk - Lq. With Lq > Lk
        # the first Lq - Lk rows see no key.
        theirs = {"attn_mask": np.arange(lk)[None, :] <= np.arange(lq)[:, None] + (lk - lq)}
    check_against_torch(torch, q, k, v, rng=rng, ours={"causal": mode}, theirs=theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hkv", [2, 1], ids=["gqa_8_2", "mqa_8_1"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_torch_gqa(isa, rng, torch, dtype, hkv, causal):
    # dk / dv sum over the query heads of each group.
    q, k, v = make_qkv(rng, 19, 70, 32, 40, batch=(2,), hq=8, hkv=hkv, dtype=dtype)
    check_against_torch(torch, q, k, v, rng=rng, ours={"causal": causal},
                        theirs={"enable_gqa": True, "is_causal": causal})


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rank", [2, 3])
def test_torch_low_rank_inputs(isa, rng, torch, dtype, rank):
    # (L, D) and (B, L, D): gradients come back in the user's shapes; torch takes the same ranks.
    batch, hq = ((), None) if rank == 2 else ((3,), None)
    q, k, v = make_qkv(rng, 21, 34, 24, 40, batch=batch, hq=hq, dtype=dtype)
    mask = rng.random((21, 34)) < 0.8
    dq, dk, dv = check_against_torch(torch, q, k, v, rng=rng, ours={"mask": mask}, theirs={"attn_mask": mask})
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_torch_non_contiguous(isa, rng, torch, dtype):
    # (B, L, H, D) layouts read through swapaxes views, a value cache sliced from a longer buffer, and a
    # strided dout: every operand is read through its strides, never copied to a contiguous layout.
    b, hq, hkv, lq, lk, d, dv = 2, 4, 2, 29, 45, 32, 24
    q = randn(rng, (b, lq, hq, d), dtype).swapaxes(1, 2)
    k = randn(rng, (b, lk, hkv, d), dtype).swapaxes(1, 2)
    v = randn(rng, (b, hkv, lk + 11, dv), dtype)[:, :, :lk]
    dout = randn(rng, (b, lq, hq, dv), dtype).swapaxes(1, 2)
    assert not any(x.flags.c_contiguous for x in (q, k, v, dout))
    check_against_torch(torch, q, k, v, dout=dout, ours={"causal": "bottom_right"},
                        theirs={"attn_mask": np.arange(lk)[None, :] <= np.arange(lq)[:, None] + (lk - lq),
                                "enable_gqa": True})


# ---------------------------------------------------------------------------------------------
# attention_vjp
# ---------------------------------------------------------------------------------------------

def test_vjp_is_forward_plus_backward(rng):
    q, k, v = make_qkv(rng, 17, 23, 16, 8, batch=(2,), hq=4, hkv=2, dtype=np.float32)
    mask = rng.random((17, 23)) < 0.8
    kwargs = dict(mask=mask, causal="bottom_right", scale=0.4, num_threads=2)
    out, backward = fusedattn.attention_vjp(q, k, v, **kwargs)
    want_out, lse = fusedattn.attention(q, k, v, return_lse=True, **kwargs)
    np.testing.assert_array_equal(out, want_out)
    dout = randn(rng, out.shape, np.float32)
    # The closure passes mask, causal, scale and num_threads on to the backward pass: bit-identical.
    for got, want in zip(backward(dout), fusedattn.attention_backward(dout, q, k, v, out, lse, **kwargs)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["return_lse", "out"])
def test_vjp_rejects_return_lse_and_out(name):
    q = np.ones((4, 8), np.float32)
    with pytest.raises(TypeError, match=name):
        fusedattn.attention_vjp(q, q, q, **{name: None})


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------

# The kernel splits the keys of a kv head into chunks when there are fewer than 8 (batch, kv head) work
# items, each chunk writing its own dq slice that a final pass sums in chunk order. B = Hkv = 1 with
# 1000 keys (16 key tiles of 64) gives 8 chunks; B * Hkv = 8 gives one chunk per kv head.
DETERMINISM_CASES = {
    "chunked_keys": dict(lq=48, lk=1000, d=32, dv=24, batch=(1,), hq=2, hkv=1),
    "unchunked": dict(lq=48, lk=200, d=32, dv=24, batch=(2,), hq=8, hkv=4),
}


@pytest.mark.parametrize("kind", ["dot", "additive"])
@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_gradients_bit_identical_across_threads(isa, rng, kind, case, causal):
    q, k, v = make_qkv(rng, dtype=np.float32, **DETERMINISM_CASES[case])
    if kind == "dot":
        forward, backward, extra = fusedattn.attention, fusedattn.attention_backward, {}
    else:
        forward, backward = fusedattn.additive_attention, fusedattn.additive_attention_backward
        extra = {"score_weight": randn(rng, (q.shape[-1],), np.float32)}
    out, lse = forward(q, k, v, causal=causal, return_lse=True, **extra)
    dout = randn(rng, out.shape, np.float32)
    first = backward(dout, q, k, v, out, lse, causal=causal, num_threads=1, **extra)
    for threads in (1, 2, 3, 2):  # 1 and 2 twice: repeated calls too
        again = backward(dout, q, k, v, out, lse, causal=causal, num_threads=threads, **extra)
        for a, b in zip(first, again):
            assert a.tobytes() == b.tobytes(), f"gradients differ at num_threads={threads}"
    # Deterministic and right: the chunked sums agree with the float64 reference.
    f64 = lambda x: x.astype(np.float64)  # noqa: E731
    ref = getattr(reference, backward.__name__)
    want = ref(f64(dout), f64(q), f64(k), f64(v), f64(out), f64(lse), causal=causal,
               **{name: f64(x) for name, x in extra.items()})
    tol = GRAD_TOL[np.dtype(np.float32)] if kind == "dot" else additive_grad_tol(np.float32, extra["score_weight"])
    assert_grads_close(first, want, tol, names=("dq", "dk", "dv", "dscore_weight")[:len(first)], dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------------

def _backward_inputs(kind):
    rng = np.random.default_rng(5)
    q, k, v = make_qkv(rng, 6, 8, 4, 3, batch=(1,), hq=2, dtype=np.float32)
    forward = fusedattn.attention if kind == "dot" else fusedattn.additive_attention
    out, lse = forward(q, k, v, return_lse=True)
    return dict(dout=np.ones_like(out), q=q, k=k, v=v, out=out, lse=lse)


def _call_backward(kind, args):
    fn = fusedattn.attention_backward if kind == "dot" else fusedattn.additive_attention_backward
    return fn(args["dout"], args["q"], args["k"], args["v"], args["out"], args["lse"])


BAD_ARGUMENTS = [
    ("dout", lambda x: x[..., :-1], ValueError),  # Dv - 1
    ("dout", lambda x: x[:, :1], ValueError),  # one head short
    ("dout", lambda x: x.astype(np.float64), TypeError),
    ("out", lambda x: x[..., :-1, :], ValueError),  # Lq - 1
    ("out", lambda x: x.astype(np.float64), TypeError),
    ("lse", lambda x: x[..., None], ValueError),  # an extra axis: lse is (..., Hq, Lq)
    ("lse", lambda x: x[..., 1:], ValueError),
    ("lse", lambda x: x.astype(np.float64), TypeError),
    ("lse", lambda x: (x > 0), TypeError),
]


@pytest.mark.parametrize("kind", ["dot", "additive"])
@pytest.mark.parametrize("name, corrupt, exc", BAD_ARGUMENTS,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_dout_out_lse(kind, name, corrupt, exc):
    args = _backward_inputs(kind)
    args[name] = corrupt(args[name])
    with pytest.raises(exc, match=rf"^{name} must have"):
        _call_backward(kind, args)


@pytest.mark.parametrize("kind", ["dot", "additive"])
def test_list_dout_is_converted_then_checked(kind):
    # dout given as nested lists is converted like any array-like, then held to the same dtype rule:
    # lists become float64, which float32 inputs reject (no silent cast of a gradient)...
    args = _backward_inputs(kind)
    args["dout"] = args["dout"].tolist()
    with pytest.raises(TypeError, match="^dout must have dtype float32"):
        _call_backward(kind, args)
    # ...and float64 inputs accept, with the same gradients as from the array.
    args = {name: x.astype(np.float64) for name, x in _backward_inputs(kind).items()}
    want = _call_backward(kind, args)
    args["dout"] = args["dout"].tolist()
    for got, expected in zip(_call_backward(kind, args), want):
        np.testing.assert_array_equal(got, expected)
