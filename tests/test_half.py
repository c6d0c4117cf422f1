"""float16 and bfloat16 (``ml_dtypes``) inputs (issue 6): float32 accumulation, output in the input dtype.

What "correct" means for a 16-bit result
-----------------------------------------
A 16-bit output cannot be closer to the exact result than one rounding: half an ulp, i.e. relative
errors up to 2^-11 (float16) / 2^-8 (bfloat16). Fixed tolerances would either hide a kernel that loses
bits on the way (a 16-bit accumulator, a probability rounded to 16 bits before ``P @ V``, truncation
instead of round-to-nearest-even) or be tuned to today's luck. So every result is judged by a
*relative oracle* on the very same 16-bit inputs:

* the truth is the float64 reference (``fusedattn.reference``) on the 16-bit inputs upcast (exactly) to
  float64, with float masks / ALiBi slopes / score weights as the kernel sees them (float32);
* the error of a result is normwise, ``max|result - truth| / max|truth|`` over the rows that attend some
  key (:func:`normwise_error`): element-wise relative errors are meaningless where outputs cancel to ~0;
* the kernel's error must be at most ``NAIVE_FACTOR`` (1.5) times that of a naive NumPy implementation
  (scores materialised, computed in float32, the result rounded once to the 16-bit dtype) plus
  ``FLOOR``, and, where torch is installed, at most ``TORCH_FACTOR`` times that of torch's
  ``scaled_dot_product_attention`` in the same dtype (its autograd for gradients) plus ``FLOOR``.

Why these numbers. Both the kernel and the naive implementation compute a float32 value within
~1e-6 (relative to the row's magnitude: float32 sums of <= 130 terms) of the truth and round it once,
so they round the same way except where a rounding boundary falls between their two float32 values;
such an element is at a near-tie for both, where both errors are ~half an ulp. Their normwise errors
therefore agree to ~1e-6 (measured: identical to all printed digits on every ISA, for every function
here). ``FLOOR = 1e-5`` covers that float32 difference with 10x headroom and is < 1/20 of the smallest
half-ulp a normwise error can show (2^-11 / 2 ~ 2.4e-4 for float16), so it cannot hide a 16-bit-level
loss; 1.5x leaves room for a different but equally sound evaluation order.

The maximum alone is a weak detector: it is one element's luck, and measured over these cases a kernel
that truncated instead of rounding, or rounded its probabilities to 16 bits before ``P @ V``, would
exceed 1.5x the naive maximum in only ~30% of them. The *mean* error (normalised the same way) averages
hundreds to thousands of roundings: the kernel's measures 1.00000x the naive one (worst 1.000005x),
truncation ~2x and 16-bit probabilities 1.5-1.7x, so ``MEAN_FACTOR = 1.25`` (with a ``MEAN_FLOOR`` of
1e-6 for the same float32 differences, averaged) catches both in every case whose result is not exact
(with Lk = 1 the output is v itself).

torch rounds its probabilities to the 16-bit dtype before ``P @ V`` and measures 1.0-4.3x the kernel's
(maximum) error; the kernel must not be worse, up to ``TORCH_FACTOR = 1.25`` for the same near-tie luck.

Float32-valued results (``lse``, ``out_dtype=np.float32``) are float32 computations on exact inputs and
get conftest's float32 tolerance (2e-5); ``dscore_weight`` (float32) is judged against the naive float32
backward's error. The 16-bit output must be exactly the float32
output rounded to nearest even: "float32 accumulation, output in the input dtype" with nothing between.

Also here: NaN / Inf propagation, float16 overflow (> 65504 becomes inf, as in the reference; the float32
accumulator itself must not overflow), dtype errors, and the 16-bit ``KVCache`` and layers.
"""
from __future__ import annotations

import functools
import math
import zlib

import numpy as np
import pytest

import fusedattn
from fusedattn import _backend, reference
from fusedattn.kv_cache import KVCache
from fusedattn.layers import AdditiveAttention, MultiHeadAttention
from fusedattn.masks import BlockDiagonal

from conftest import TOL

try:  # bfloat16 comes from ml_dtypes, an optional dependency of fusedattn
    import ml_dtypes
except ImportError:  # pragma: no cover - the float16 half of the file still runs
    ml_dtypes = None

F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16) if ml_dtypes is not None else None
HALF = [
    pytest.param("float16", id="f16"),
    pytest.param("bfloat16", id="bf16",
                 marks=pytest.mark.skipif(ml_dtypes is None, reason="bfloat16 needs ml_dtypes: pip install ml_dtypes")),
]
F32_TOL = TOL[np.dtype(np.float32)]

NAIVE_FACTOR = 1.5
TORCH_FACTOR = 1.25
FLOOR = 1e-5
MEAN_FACTOR = 1.25
MEAN_FLOOR = 1e-6


def half(name) -> np.dtype:
    return F16 if name == "float16" else BF16


def eps(dtype) -> float:
    return float(ml_dtypes.finfo(dtype).eps) if dtype == BF16 else float(np.finfo(dtype).eps)


def f32(x):
    return None if x is None else np.asarray(x).astype(np.float32)


def f64(x):
    return None if x is None else np.asarray(x).astype(np.float64)


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def normwise_error(got, truth, rows=None, reduce=np.max) -> float:
    """``max|got - truth| / max|truth|`` (or the mean error, ``reduce=np.mean``) over the (..., L, :) rows
    where ``rows`` is True (all by default)."""
    got, truth = np.asarray(got).astype(np.float64), np.asarray(truth, np.float64)
    if rows is not None:
        got, truth = got[rows], truth[rows]
    if truth.size == 0:
        return 0.0
    return float(reduce(np.abs(got - truth)) / max(float(np.max(np.abs(truth))), np.finfo(np.float64).tiny))


def assert_oracle(name, got, truth, naive, rows=None, theirs=None):
    """The kernel's normwise error is within NAIVE_FACTOR of naive (and TORCH_FACTOR of torch) + FLOOR."""
    err = normwise_error(got, truth, rows)
    err_naive = normwise_error(naive, truth, rows)
    assert err <= NAIVE_FACTOR * err_naive + FLOOR, (
        f"{name}: normwise error {err:.3g} exceeds {NAIVE_FACTOR} x the naive float32-then-round error "
        f"({err_naive:.3g}) + {FLOOR}")
    mean, mean_naive = (normwise_error(x, truth, rows, reduce=np.mean) for x in (got, naive))
    assert mean <= MEAN_FACTOR * mean_naive + MEAN_FLOOR, (
        f"{name}: mean error {mean:.3g} exceeds {MEAN_FACTOR} x the naive float32-then-round mean error "
        f"({mean_naive:.3g}) + {MEAN_FLOOR}")
    if theirs is not None:
        err_torch = normwise_error(theirs, truth, rows)
        assert err <= TORCH_FACTOR * err_torch + FLOOR, (
            f"{name}: normwise error {err:.3g} exceeds {TORCH_FACTOR} x torch's error in the same dtype "
            f"({err_torch:.3g}) + {FLOOR}")


# ---------------------------------------------------------------------------------------------
# Naive float32 implementations (materialised scores), rounded once to the 16-bit dtype by the caller
# ---------------------------------------------------------------------------------------------

def allowed_and_bias(kwargs, lead, lq, lk):
    """Which keys each query may attend (bool) and the float mask added to the scores, from the kwargs."""
    allowed = np.ones(lead + (lq, lk), bool)
    bias = np.zeros((), np.float32)
    causal = kwargs.get("causal", False)
    if causal is not False:
        offset = 0 if causal in (True, "top_left") else lk - lq
        allowed &= np.arange(lk)[None, :] <= np.arange(lq)[:, None] + offset
    mask = kwargs.get("mask")
    if mask is not None:
        if np.asarray(mask).dtype == np.bool_:
            allowed &= np.broadcast_to(mask, allowed.shape)
        else:
            bias = f32(mask)
    return allowed, bias


def repeat_kv(x, hq):
    return np.repeat(x, hq // x.shape[-3], axis=-3)


def naive_probabilities(scores, allowed, bias, round_to=None):
    """float32 masked softmax; rows that attend nothing give 0 (the kernel's rule). With ``round_to``, the
    unnormalised exponentials are rounded to that dtype before the (float32) normalisation: the
    probabilities that torch's bfloat16 SDPA (and fusedattn's native AVX512-BF16 path) feed to P @ V."""
    if scores.shape[-1] == 0:  # no keys at all (an empty sequence of a packed batch)
        return np.zeros(scores.shape, np.float32)
    s = np.where(allowed, scores + bias, np.float32(-np.inf))
    mx = s.max(axis=-1, keepdims=True)
    dead = np.isneginf(mx)
    e = np.exp(s - np.where(dead, np.float32(0), mx))
    total = np.where(dead, np.float32(1), e.sum(axis=-1, keepdims=True))
    if round_to is not None:
        e = e.astype(round_to).astype(np.float32)
    return e / total


def dot_scores(q, k, scale):
    q, k = f32(q), repeat_kv(f32(k), q.shape[-3])
    return (q @ np.swapaxes(k, -1, -2)) * np.float32(1 / math.sqrt(q.shape[-1]) if scale is None else scale)


def additive_scores(q, k, weight):
    q, k = f32(q), repeat_kv(f32(k), q.shape[-3])
    return np.tanh(q[..., :, None, :] + k[..., None, :, :]) @ f32(weight)


def naive_attention(q, k, v, scores, kwargs, round_to=None):
    allowed, bias = allowed_and_bias(kwargs, q.shape[:-2], q.shape[-2], k.shape[-2])
    return naive_probabilities(scores, allowed, bias, round_to) @ repeat_kv(f32(v), q.shape[-3])


def paired_bf16(isa, dtype_name) -> bool:
    """Whether a forward call with 16-bit output rounds P to bfloat16 for P @ V: the native AVX512-BF16
    path and the AMX tiles do, like torch's bfloat16 SDPA; its naive counterpart is
    ``naive_attention(..., round_to=BF16)``."""
    return isa in ("avx512bf16", "amx", "amx-model") and dtype_name == "bfloat16"


def group_sum(grad, hkv):
    """Sum the query heads of each GQA group onto their kv head."""
    return grad.reshape(grad.shape[:-3] + (hkv, grad.shape[-3] // hkv) + grad.shape[-2:]).sum(axis=-3)


def naive_backward(dout, q, k, v, out, lse, kwargs, weight=None):
    """FlashAttention-style float32 backward from the *given* 16-bit out and float32 lse, as the kernel gets
    them: P = exp(s - lse), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), then dQ / dK (and dW)."""
    hq, hkv = q.shape[-3], k.shape[-3]
    scale = np.float32(1 / math.sqrt(q.shape[-1]) if kwargs.get("scale") is None else kwargs["scale"])
    scores = dot_scores(q, k, kwargs.get("scale")) if weight is None else additive_scores(q, k, weight)
    allowed, bias = allowed_and_bias(kwargs, q.shape[:-2], q.shape[-2], k.shape[-2])
    lse = f32(lse)[..., None]
    live = np.isfinite(lse)
    p = np.where(allowed & live, np.exp(scores + bias - np.where(live, lse, 0)), np.float32(0))
    dout, out, kr, vr, q32 = f32(dout), f32(out), repeat_kv(f32(k), hq), repeat_kv(f32(v), hq), f32(q)
    dv = np.swapaxes(p, -1, -2) @ dout
    ds = p * (dout @ np.swapaxes(vr, -1, -2) - (dout * out).sum(axis=-1, keepdims=True))
    if weight is None:
        dq, dk = (ds @ kr) * scale, (np.swapaxes(ds, -1, -2) @ q32) * scale
        return dq, group_sum(dk, hkv), group_sum(dv, hkv)
    t = np.tanh(q32[..., :, None, :] + kr[..., None, :, :])
    g = ds[..., None] * (1 - t * t) * f32(weight)
    dw = (ds[..., None] * t).sum(axis=tuple(range(t.ndim - 1)))
    return g.sum(axis=-2), group_sum(g.sum(axis=-3), hkv), group_sum(dv, hkv), dw


# ---------------------------------------------------------------------------------------------
# torch (optional)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


@pytest.fixture
def torch():
    module = _torch()
    if module is None:
        pytest.skip("torch is not installed (optional: pip install torch==2.13.0)")
    return module


def to_torch(torch, x, dtype_name, requires_grad=False):
    # Through float32, which holds every 16-bit value exactly (torch cannot import ml_dtypes arrays).
    t = torch.from_numpy(np.ascontiguousarray(f32(x))).to(getattr(torch, dtype_name))
    return t.requires_grad_(requires_grad)


def torch_sdpa_kwargs(torch, kwargs, dtype_name, hq, hkv, lq, lk):
    out = {"enable_gqa": hq != hkv}
    if kwargs.get("scale") is not None:
        out["scale"] = kwargs["scale"]
    causal = kwargs.get("causal", False)
    mask = kwargs.get("mask")
    if causal in (True, "top_left") and mask is None:
        out["is_causal"] = True
    elif causal is not False or mask is not None:
        allowed, bias = allowed_and_bias(kwargs, np.shape(mask)[:-2] if mask is not None else (), lq, lk)
        if np.ndim(bias):  # torch wants a float mask in q's dtype: rounded, part of torch's own error
            out["attn_mask"] = to_torch(torch, np.where(allowed, bias, -np.inf), dtype_name)
        else:
            out["attn_mask"] = torch.from_numpy(np.ascontiguousarray(allowed))
    return out


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

# Lq, Lk in {1, 7, 64, 130} (one key, less than a SIMD width, a tile, two tiles and a tail) and
# D in {8, 40, 64, 128}, each shape with every option.
SHAPES = [(1, 1, 8), (1, 130, 128), (7, 64, 40), (64, 7, 64), (130, 130, 8), (64, 130, 128), (130, 1, 40),
          (7, 7, 128)]
OPTIONS = ["plain", "causal", "bottom_right", "bool_mask", "float_mask", "gqa"]
B = 2


def make_case(dtype_name, lq, lk, d, option, dv=None):
    """(q, k, v, dout, kwargs) for one case, in the 16-bit dtype; float masks in float32."""
    dtype = half(dtype_name)
    rng = np.random.default_rng(_seed("half", dtype_name, lq, lk, d, option))
    hq, hkv = (8, 2) if option == "gqa" else (4, 4)
    dv = d if dv is None else dv
    q = rng.standard_normal((B, hq, lq, d)).astype(dtype)
    k = rng.standard_normal((B, hkv, lk, d)).astype(dtype)
    v = rng.standard_normal((B, hkv, lk, dv)).astype(dtype)
    dout = rng.standard_normal((B, hq, lq, dv)).astype(dtype)
    kwargs = {}
    if option == "causal":
        kwargs["causal"] = True
    elif option == "bottom_right":  # with Lq > Lk the first Lq - Lk rows attend nothing
        kwargs["causal"] = "bottom_right"
    elif option == "bool_mask":
        mask = rng.random((B, hq, lq, lk)) < 0.7
        mask[0, 1, 0] = False  # one row that attends nothing
        kwargs["mask"] = mask
    elif option == "float_mask":
        mask = (rng.standard_normal((lq, lk)) * 2).astype(np.float32)
        mask[:, lk // 2] = -np.inf  # a key nobody sees (no row is left empty unless Lk == 1)
        kwargs["mask"] = mask if lk > 1 else np.zeros((lq, lk), np.float32)
    return q, k, v, dout, kwargs


FORWARD_CASES = [(lq, lk, d, option) for lq, lk, d in SHAPES for option in OPTIONS]


def case_id(case):
    return "-".join(map(str, case))


@functools.lru_cache(maxsize=None)
def naive_paired(dtype_name, case):
    """The naive float32 result with P rounded to bfloat16 for P @ V, rounded to the output dtype."""
    q, k, v, _, kwargs = make_case(dtype_name, *case)
    return naive_attention(q, k, v, dot_scores(q, k, kwargs.get("scale")), kwargs, round_to=BF16).astype(half(dtype_name))


@functools.lru_cache(maxsize=None)
def forward_expectations(dtype_name, case):
    """Truth (float64 out, lse), the naive float32 result rounded, and torch's (or None): ISA-independent."""
    q, k, v, _, kwargs = make_case(dtype_name, *case)
    dtype = half(dtype_name)
    truth = reference.attention(f64(q), f64(k), f64(v), return_lse=True,
                                **{n: (f64(x) if n == "mask" and np.asarray(x).dtype != np.bool_ else x)
                                   for n, x in kwargs.items()})
    naive = naive_attention(q, k, v, dot_scores(q, k, kwargs.get("scale")), kwargs).astype(dtype)
    theirs = None
    torch = _torch()
    if torch is not None:
        tq, tk, tv = (to_torch(torch, x, dtype_name) for x in (q, k, v))
        with torch.no_grad():
            theirs = torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, **torch_sdpa_kwargs(torch, kwargs, dtype_name, q.shape[1], k.shape[1], q.shape[2],
                                                k.shape[2])).float().numpy()
    return truth, naive, theirs


def live_rows(lse):
    """(..., L) bool: rows that attend some key (the normwise errors are taken over these)."""
    return np.isfinite(lse)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype_name", HALF)
@pytest.mark.parametrize("case", FORWARD_CASES, ids=case_id)
def test_attention_relative_oracle(isa, dtype_name, case):
    q, k, v, _, kwargs = make_case(dtype_name, *case)
    dtype = half(dtype_name)
    (truth_out, truth_lse), naive, _ = forward_expectations(dtype_name, case)
    paired = paired_bf16(isa, dtype_name)
    out, lse = fusedattn.attention(q, k, v, return_lse=True, **kwargs)
    assert out.dtype == dtype and out.shape == truth_out.shape
    assert lse.dtype == np.float32 and lse.shape == truth_lse.shape
    live = live_rows(truth_lse)
    assert_oracle("out", out, truth_out, naive_paired(dtype_name, case) if paired else naive, live)
    # lse is a float32 computation on exact inputs (the paired products are exact too, summed in float32).
    np.testing.assert_allclose(lse, truth_lse, **F32_TOL)
    assert np.all(out[~live] == 0), "a row that attends nothing must give exactly 0"

    out32 = fusedattn.attention(q, k, v, out_dtype=np.float32, **kwargs)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, truth_out, **F32_TOL)
    if paired:
        # P rounded to bfloat16 (2^-9 relative each) and the output rounded once more (2^-9): within one
        # bfloat16 eps (2^-8) of the float32 output, normwise.
        assert normwise_error(out, out32, live) <= eps(dtype)
    else:
        # The 16-bit output is the float32 result rounded to nearest even, once.
        np.testing.assert_array_equal(out, out32.astype(dtype))


@pytest.mark.parametrize("dtype_name", HALF)
@pytest.mark.parametrize("case", FORWARD_CASES, ids=case_id)
def test_attention_vs_torch(isa, torch, dtype_name, case):
    q, k, v, _, kwargs = make_case(dtype_name, *case)
    (truth_out, truth_lse), naive, theirs = forward_expectations(dtype_name, case)
    if paired_bf16(isa, dtype_name):
        naive = naive_paired(dtype_name, case)
    out = fusedattn.attention(q, k, v, **kwargs)
    # Rows that attend nothing are 0 here and NaN or 0 in torch, depending on its path: left out.
    assert_oracle("out", out, truth_out, naive, live_rows(truth_lse), theirs)


def odd_layouts(x):
    """The same values seen through layouts the kernel must read differently: an odd row stride (rows
    carved from a wider buffer), every other column, reversed columns."""
    wide = np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype)
    wide[..., :-1] = x
    stepped = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    stepped[..., ::2] = x
    flipped = np.ascontiguousarray(x[..., ::-1])[..., ::-1]
    return {"odd_row_stride": wide[..., :-1], "stepped": stepped[..., ::2], "reversed_columns": flipped}


@pytest.mark.parametrize("dtype_name", HALF)
@pytest.mark.parametrize("d, dv", [(63, 40), (7, 80), (96, 96), (256, 33)], ids=lambda x: str(x))
def test_attention_layouts_and_odd_dims(isa, dtype_name, d, dv):
    """Odd D (the last bf16 pair half empty), Dv not a whole number of 32-word permutes, and K / V / Q read
    in place or packed: every layout gives the contiguous call's bits, and that call is within the oracle."""
    q, k, v, _, kwargs = make_case(dtype_name, 70, 131, d, "causal", dv=dv)
    truth = reference.attention(f64(q), f64(k), f64(v), **kwargs)
    naive = naive_attention(q, k, v, dot_scores(q, k, None), kwargs,
                            round_to=BF16 if paired_bf16(isa, dtype_name) else None).astype(q.dtype)
    want = fusedattn.attention(q, k, v, **kwargs)
    assert_oracle("out", want, truth, naive)
    for name, (qx, kx, vx) in zip(odd_layouts(q), zip(*(odd_layouts(x).values() for x in (q, k, v)))):
        got = fusedattn.attention(qx, kx, vx, **kwargs)
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.skipif(ml_dtypes is None, reason="bfloat16 needs ml_dtypes: pip install ml_dtypes")
def test_avx512bf16_level_switches_only_bfloat16_products():
    """FUSEDATTN_ISA=avx512bf16 turns the native products on for bfloat16 output and nothing else; avx512
    turns them off (the float32-output and float32-input results are the AVX-512 path's, bit for bit)."""
    if not {"avx512", "avx512bf16"} <= set(_backend.available_isas()):
        pytest.skip("needs a CPU with AVX512-BF16 (and a build with the avx512bf16 level)")
    q, k, v, _, kwargs = make_case("bfloat16", 130, 200, 64, "causal")
    calls = {
        "bf16 out": lambda: fusedattn.attention(q, k, v, **kwargs),
        "f32 out": lambda: fusedattn.attention(q, k, v, out_dtype=np.float32, **kwargs),
        "f32 in": lambda: fusedattn.attention(f32(q), f32(k), f32(v), **kwargs),
        "weights": lambda: fusedattn.attention_weights(q, k, **kwargs),
    }
    got = {}
    for name in ("avx512", "avx512bf16"):
        previous = _backend.force_isa(name)
        try:
            got[name] = {call: run() for call, run in calls.items()}
        finally:
            _backend.force_isa(previous)
    for call in ("f32 out", "f32 in", "weights"):
        np.testing.assert_array_equal(got["avx512bf16"][call], got["avx512"][call], err_msg=call)
    # P rounded to bfloat16 moves some outputs by an ulp or more: the native path really ran.
    assert not np.array_equal(got["avx512bf16"]["bf16 out"], got["avx512"]["bf16 out"])


@pytest.mark.parametrize("dtype_name", HALF)
def test_attention_2d_3d_and_strided_inputs(isa, dtype_name):
    """16-bit arrays are read through their strides like any other: (L, D), (B, L, D), transposed views."""
    q, k, v, _, _ = make_case(dtype_name, 64, 130, 40, "plain")
    want = fusedattn.attention(q, k, v, causal="bottom_right")
    for rank_q, rank_k, rank_v in (((q[0, 1]), (k[0, 1]), (v[0, 1])), ((q[:, 1]), (k[:, 1]), (v[:, 1]))):
        got = fusedattn.attention(rank_q, rank_k, rank_v, causal="bottom_right")
        np.testing.assert_array_equal(got, want[0, 1] if got.ndim == 2 else want[:, 1])
    # (B, L, H, D) storage seen as (B, H, L, D).
    qt, kt, vt = (np.ascontiguousarray(x.swapaxes(1, 2)).swapaxes(1, 2) for x in (q, k, v))
    np.testing.assert_array_equal(fusedattn.attention(qt, kt, vt, causal="bottom_right"), want)


# ---------------------------------------------------------------------------------------------
# additive_attention and attention_weights
# ---------------------------------------------------------------------------------------------

ADDITIVE_CASES = [(7, 64, 40, "plain"), (64, 7, 8, "bottom_right"), (1, 130, 64, "bool_mask"),
                  (130, 7, 128, "gqa"), (7, 7, 8, "float_mask"), (130, 1, 40, "causal")]


@pytest.mark.parametrize("dtype_name", HALF)
@pytest.mark.parametrize("case", ADDITIVE_CASES, ids=case_id)
def test_additive_attention_relative_oracle(isa, dtype_name, case):
    q, k, v, _, kwargs = make_case(dtype_name, *case)
    dtype = half(dtype_name)
    weight = np.random.default_rng(_seed("w", case)).standard_normal(q.shape[-1]).astype(np.float32)
    out, lse = fusedattn.additive_attention(q, k, v, score_weight=weight, return_lse=True, **kwargs)
    truth_out, truth_lse = reference.additive_attention(
        f64(q), f64(k), f64(v), score_weight=f64(weight), return_lse=True,
        **{n: (f64(x) if n == "mask" and np.asarray(x).dtype != np.bool_ else x) for n, x in kwargs.items()})
    naive = naive_attention(q, k, v, additive_scores(q, k, weight), kwargs).astype(dtype)
    assert out.dtype == dtype and lse.dtype == np.float32
    live = live_rows(truth_lse)
    assert_oracle("out", out, truth_out, naive, live)
    # Additive scores sum D tanh terms of size |w_d|: their float32 rounding is ~eps32 * sum|w| (test_additive).
    np.testing.assert_allclose(lse, truth_lse, atol=2e-6 * (10 + np.abs(weight).sum()), rtol=F32_TOL["rtol"])
    out32 = fusedattn.additive_attention(q, k, v, score_weight=weight, out_dtype=np.float32, **kwargs)
    np.testing.assert_array_equal(out, out32.astype(dtype))


@pytest.mark.parametrize("dtype_name", HALF)
@pytest.mark.parametrize("kind", ["dot", "additive"])
@pytest.mark.parametrize("case", [(7, 64, 40, "bool_mask"), (64, 130, 8, "bottom_right"), (130, 7, 64, "gqa")],
                         ids=case_id)
def test_attention_weights_relative_oracle(isa, dtype_name, kind, case):
    q, k, _, _, kwargs = make_case(dtype_name, *case)
    dtype = half(dtype_name)
    extra = {}
    if kind == "additive":
        extra["score_weight"] = np.random.default_rng(_seed("w", case)).standard_normal(q.shape[-1]).astype(np.float32)
    weights = fusedattn.attention_weights(q, k, kind=kind, **extra, **kwargs)
    truth = reference.attention_weights(f64(q), f64(k), kind=kind, **{n: f64(x) for n, x in extra.items()}, **kwargs)
    scores = dot_scores(q, k, None) if kind == "dot" else additive_scores(q, k, extra["score_weight"])
    allowed, bias = allowed_and_bias(kwargs, q.shape[:-2], q.shape[-2], k.shape[-2])
    naive = naive_probabilities(scores, allowed, bias).astype(dtype)
    assert weights.dtype == dtype and weights.shape == truth.shape
    assert_oracle("weights", weights, truth, naive)
    dead = truth.sum(axis=-1) == 0
    assert np.all(weights[dead] == 0)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

BACKWARD_CASES = [(7, 64, 40, "plain"), (64, 130, 128, "bottom_right"), (130, 7, 8, "bool_mask"),
                  (64, 64, 64, "gqa"), (1, 130, 64, "causal"), (130, 1, 40, "plain"), (7, 7, 128, "float_mask")]


def _truth_grads(dout, q, k, v, kwargs, weight=None):
    kw = {n: (f64(x) if n == "mask" and np.asarray(x).dtype != np.bool_ else x) for n, x in kwargs.items()}
    if weight is None:
        out, lse = reference.attention(f64(q), f64(k), f64(v), return_lse=True, **kw)
        return reference.attention_backward(f64(dout), f64(q), f64(k), f64(v), out, lse, **kw)
    out, lse = reference.additive_attention(f64(q), f64(k), f64(v), score_weight=f64(weight), return_lse=True, **kw)
    return reference.additive_attention_backward(f64(dout), f64(q), f64(k), f64(v), out, lse, score_weight=f64(weight),
                                                 **kw)


@pytest.mark.parametrize("dtype_name", HALF)
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=case_id)
def test_attention_backward_relative_oracle(isa, dtype_name, case):
    q, k, v, dout, kwargs = make_case(dtype_name, *case)
    dtype = half(dtype_name)
    out, lse = fusedattn.attention(q, k, v, return_lse=True, **kwargs)
    grads = fusedattn.attention_backward(dout, q, k, v, out, lse, **kwargs)
    truth = _truth_grads(dout, q, k, v, kwargs)
    naive = [g.astype(dtype) for g in naive_backward(dout, q, k, v, out, lse, kwargs)]
    theirs = [None] * 3
    torch = _torch()
    if torch is not None:
        tq, tk, tv = (to_torch(torch, x, dtype_name, requires_grad=True) for x in (q, k, v))
        t_out = torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, **torch_sdpa_kwargs(torch, kwargs, dtype_name, q.shape[1], k.shape[1], q.shape[2], k.shape[2]))
        t_out.backward(to_torch(torch, dout, dtype_name))
        theirs = [x.grad.float().numpy() for x in (tq, tk, tv)]
        if not all(np.isfinite(t).all() for t in theirs):  # torch's NaN for rows that attend nothing
            theirs = [None] * 3
    for name, g, x, want, ours_naive, their in zip(("dq", "dk", "dv"), grads, (q, k, v), truth, naive, theirs):
        assert g.dtype == dtype and g.shape == x.shape, name
        assert np.isfinite(g).all(), f"{name}: non-finite gradient"
        assert_oracle(name, g, want, ours_naive, theirs=their)
    assert np.all(grads[0][~np.isfinite(lse)] == 0), "rows that attend nothing get dq = 0"


@pytest.mark.parametrize("dtype_name", HALF)
@pytest.mark.parametrize("case", [(7, 64, 40, "plain"), (64, 7, 8, "bottom_right"), (7, 7, 16, "gqa")], ids=case_id)
def test_additive_backward_relative_oracle(isa, dtype_name, case):
    q, k, v, dout, kwargs = make_case(dtype_name, *case)
    dtype = half(dtype_name)
    weight = np.random.default_rng(_seed("w", case)).standard_normal(q.shape[-1]).astype(np.float32)
    out, lse = fusedattn.additive_attention(q, k, v, score_weight=weight, return_lse=True, **kwargs)
    grads = fusedattn.additive_attention_backward(dout, q, k, v, out, lse, score_weight=weight, **kwargs)
    truth = _truth_grads(dout, q, k, v, kwargs, weight)
    naive = naive_backward(dout, q, k, v, out, lse, kwargs, weight)
    for name, g, want, ours_naive in zip(("dq", "dk", "dv"), grads[:3], truth[:3], naive[:3]):
        assert g.dtype == dtype, name
        assert_oracle(name, g, want, ours_naive.astype(dtype))
    # dscore_weight stays float32 (a sum over every (query, key) pair: rounding it to 16 bits would only
    # lose information); judged like a float32 result, relative to the naive float32 one.
    assert grads[3].dtype == np.float32
    assert normwise_error(grads[3], truth[3]) <= NAIVE_FACTOR * normwise_error(naive[3], truth[3]) + FLOOR


# ---------------------------------------------------------------------------------------------
# Packed variable-length batches and BlockDiagonal
# ---------------------------------------------------------------------------------------------

VARLEN_Q, VARLEN_K = [1, 7, 64, 130, 0, 5], [7, 130, 1, 64, 3, 0]


def varlen_case(dtype_name):
    dtype = half(dtype_name)
    rng = np.random.default_rng(_seed("varlen", dtype_name))
    tq, tk = sum(VARLEN_Q), sum(VARLEN_K)
    q, k, v, dout = (rng.standard_normal(s).astype(dtype) for s in ((tq, 4, 40), (tk, 2, 40), (tk, 2, 24), (tq, 4, 24)))
    cu = [np.concatenate([[0], np.cumsum(x)]) for x in (VARLEN_Q, VARLEN_K)]
    return q, k, v, dout, cu[0], cu[1]


def per_sequence(fn, q, k, v, cu_q, cu_k, *extra):
    """Apply ``fn(q, k, v, *extra)`` to each sequence in the (1, H, L, D) layout and pack the results."""
    results = []
    for b in range(cu_q.size - 1):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        views = [x[r].swapaxes(0, 1)[None] for x, r in ((q, rq), (k, rk), (v, rk))]
        results.append(fn(*views, *(x[rq].swapaxes(0, 1)[None] for x in extra)))
    return results


@pytest.mark.parametrize("dtype_name", HALF)
def test_varlen_forward(isa, dtype_name):
    dtype = half(dtype_name)
    q, k, v, _, cu_q, cu_k = varlen_case(dtype_name)
    kwargs = dict(causal="bottom_right")
    truth_out, truth_lse = reference.attention_varlen(f64(q), f64(k), f64(v), cu_q, cu_k, return_lse=True, **kwargs)
    round_to = BF16 if paired_bf16(isa, dtype_name) else None
    naive = np.concatenate([o[0].swapaxes(0, 1) for o in per_sequence(
        lambda q_, k_, v_: naive_attention(q_, k_, v_, dot_scores(q_, k_, None), kwargs, round_to), q, k, v, cu_q,
        cu_k)])
    out = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, **kwargs)
    assert out.dtype == dtype
    live = live_rows(truth_lse).T  # (total_q, Hq)
    assert_oracle("out", out, truth_out, naive.astype(dtype), live)
    assert np.all(out[~live] == 0)
    # return_lse: FlashAttention's (Hq, total_q) layout, float32 like every 16-bit lse.
    out2, lse = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kwargs)
    np.testing.assert_array_equal(out2, out)
    assert lse.dtype == np.float32 and lse.shape == (4, q.shape[0])
    np.testing.assert_allclose(lse, truth_lse, **F32_TOL)


@pytest.mark.parametrize("dtype_name", HALF)
def test_varlen_backward(isa, dtype_name):
    dtype = half(dtype_name)
    q, k, v, dout, cu_q, cu_k = varlen_case(dtype_name)
    kwargs = dict(causal="bottom_right")
    out, lse = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kwargs)
    grads = fusedattn.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **kwargs)
    truth_out, truth_lse = reference.attention_varlen(f64(q), f64(k), f64(v), cu_q, cu_k, return_lse=True, **kwargs)
    truth = reference.attention_varlen_backward(f64(dout), f64(q), f64(k), f64(v), truth_out, truth_lse, cu_q, cu_k,
                                                **kwargs)
    naive = [np.zeros(x.shape, np.float32) for x in (q, k, v)]
    for b in range(cu_q.size - 1):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        seq = [x[r].swapaxes(0, 1)[None] for x, r in ((dout, rq), (q, rq), (k, rk), (v, rk), (out, rq))]
        for dst, g, r in zip(naive, naive_backward(*seq, lse[None, :, rq], kwargs), (rq, rk, rk)):
            dst[r] = g[0].swapaxes(0, 1)
    for name, g, want, ours_naive in zip(("dq", "dk", "dv"), grads, truth, naive):
        assert g.dtype == dtype, name
        assert_oracle(name, g, want, ours_naive.astype(dtype))


@pytest.mark.parametrize("dtype_name", HALF)
def test_block_diagonal_is_varlen(isa, dtype_name):
    """The dense API with a BlockDiagonal mask runs the packed kernel: bit-identical on the same memory."""
    q, k, v, dout, cu_q, cu_k = varlen_case(dtype_name)
    mask = BlockDiagonal.from_seqlens(VARLEN_Q, VARLEN_K)
    dense = [x.swapaxes(0, 1)[None] for x in (q, k, v, dout)]  # (1, H, total, D) views of the packed arrays
    out, lse = fusedattn.attention(*dense[:3], mask=mask, causal=True, return_lse=True)
    assert out.dtype == half(dtype_name) and lse.dtype == np.float32
    np.testing.assert_array_equal(out[0].swapaxes(0, 1), fusedattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True))
    grads = fusedattn.attention_backward(dense[3], *dense[:3], out, lse, mask=mask, causal=True)
    want = fusedattn.attention_varlen_backward(dout, q, k, v, out[0].swapaxes(0, 1), lse[0], cu_q, cu_k, causal=True)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want):
        np.testing.assert_array_equal(g[0].swapaxes(0, 1), w, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Masks, slopes and score weights in any float dtype; dtype errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype_name", HALF)
@pytest.mark.parametrize("side_dtype", ["float16", "bfloat16", "float64"])
def test_float_side_inputs_are_cast_to_float32(dtype_name, side_dtype):
    """A float mask, ALiBi slopes and score_weight of any float dtype are read as float32 (their values kept)."""
    if side_dtype == "bfloat16" and ml_dtypes is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    side = half(side_dtype) if side_dtype != "float64" else np.dtype(np.float64)
    q, k, v, _, _ = make_case(dtype_name, 7, 64, 40, "plain")
    rng = np.random.default_rng(1)
    mask = rng.standard_normal((7, 64)).astype(side)
    slopes = rng.uniform(0.01, 0.5, 4).astype(side)
    weight = rng.standard_normal(40).astype(side)
    np.testing.assert_array_equal(fusedattn.attention(q, k, v, mask=mask), fusedattn.attention(q, k, v, mask=f32(mask)))
    np.testing.assert_array_equal(fusedattn.attention(q, k, v, alibi_slopes=slopes),
                                  fusedattn.attention(q, k, v, alibi_slopes=f32(slopes)))
    np.testing.assert_array_equal(fusedattn.additive_attention(q, k, v, score_weight=weight),
                                  fusedattn.additive_attention(q, k, v, score_weight=f32(weight)))


@pytest.mark.parametrize("dtype_name", HALF)
def test_default_score_weight(dtype_name):
    """score_weight=None means all ones, for 16-bit inputs too (forward, weights and backward)."""
    q, k, v, dout, _ = make_case(dtype_name, 7, 64, 40, "plain")
    ones = np.ones(40, np.float32)
    out, lse = fusedattn.additive_attention(q, k, v, return_lse=True)
    np.testing.assert_array_equal(out, fusedattn.additive_attention(q, k, v, score_weight=ones))
    np.testing.assert_array_equal(fusedattn.attention_weights(q, k, kind="additive"),
                                  fusedattn.attention_weights(q, k, kind="additive", score_weight=ones))
    for g, w in zip(fusedattn.additive_attention_backward(dout, q, k, v, out, lse),
                    fusedattn.additive_attention_backward(dout, q, k, v, out, lse, score_weight=ones)):
        np.testing.assert_array_equal(g, w)


def _mixed_cases():
    x16 = np.zeros((2, 3, 8), np.float16)
    x32 = np.zeros((2, 3, 8), np.float32)
    cases = [("f16_q_f32_kv", (x16, x32, x32)), ("f32_q_f16_v", (x32, x32, x16))]
    if ml_dtypes is not None:
        xbf = x32.astype(ml_dtypes.bfloat16)
        cases += [("f16_q_bf16_k", (x16, xbf, x16)), ("bf16_q_f32_v", (xbf, xbf, x32))]
    return cases


@pytest.mark.parametrize("arrays", [c[1] for c in _mixed_cases()], ids=[c[0] for c in _mixed_cases()])
def test_mixed_dtypes_are_type_errors(arrays):
    q, k, v = arrays
    pattern = r"q, k and v must share one dtype"
    with pytest.raises(TypeError, match=pattern):
        fusedattn.attention(q, k, v)
    with pytest.raises(TypeError, match=pattern):
        fusedattn.additive_attention(q, k, v)
    with pytest.raises(TypeError, match=pattern):
        fusedattn.attention_varlen(q.reshape(6, 1, 8), k.reshape(6, 1, 8), v.reshape(6, 1, 8), [0, 6], [0, 6])
    if k.dtype != q.dtype:
        with pytest.raises(TypeError, match=pattern):
            fusedattn.attention_weights(q, k)


@pytest.mark.parametrize("dtype_name", HALF)
def test_out_dtype_and_lse_dtype_errors(dtype_name):
    q, k, v, dout, _ = make_case(dtype_name, 7, 7, 8, "plain")
    dtype = half(dtype_name)
    with pytest.raises(TypeError, match=r"out_dtype must be the inputs' dtype .* or, for 16-bit inputs, float32"):
        fusedattn.attention(q, k, v, out_dtype=np.float64)
    with pytest.raises(TypeError, match=r"out_dtype"):
        fusedattn.attention(f32(q), f32(k), f32(v), out_dtype=np.float16)  # float32 inputs have no 16-bit output
    with pytest.raises(TypeError, match=r"out must have dtype float32"):
        fusedattn.attention(q, k, v, out_dtype=np.float32, out=np.empty(q.shape, dtype))
    out = np.empty(q.shape, np.float32)
    assert fusedattn.attention(q, k, v, out_dtype=np.float32, out=out) is out
    o, lse = fusedattn.attention(q, k, v, return_lse=True)
    with pytest.raises(TypeError, match=r"lse must have dtype float32"):
        fusedattn.attention_backward(dout, q, k, v, o, lse.astype(dtype))
    with pytest.raises(TypeError, match=r"dout must have dtype"):
        fusedattn.attention_backward(f32(dout), q, k, v, o, lse)


# ---------------------------------------------------------------------------------------------
# NaN / Inf and float16 overflow
# ---------------------------------------------------------------------------------------------

def reference_on_same_inputs(fn, *args, **kwargs):
    # The reference casts its float64 result to the 16-bit dtype; NumPy warns on a cast that overflows
    # (values > 65504 becoming inf in float16) and on inf - inf in the softmax (an infinite score): the
    # very behaviour under test here.
    with np.errstate(over="ignore", invalid="ignore"):
        return fn(*args, **kwargs)


def assert_same_non_finite(got, want, name):
    got, want = np.asarray(got).astype(np.float64), np.asarray(want).astype(np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name}: NaN pattern")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want), err_msg=f"{name}: +inf pattern")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"{name}: -inf pattern")


@pytest.mark.parametrize("dtype_name", HALF)
@pytest.mark.parametrize("poison", ["q_nan", "k_nan", "v_nan", "v_inf", "k_inf"])
def test_nan_inf_propagate_like_the_reference(isa, dtype_name, poison):
    q, k, v, _, _ = make_case(dtype_name, 7, 64, 40, "plain")
    q, k, v = q.copy(), k.copy(), v.copy()
    if poison == "q_nan":
        q[0, 1, 3, 5] = np.nan       # that one row
    elif poison == "k_nan":
        k[1, 2, 60, 0] = np.nan      # the rows of (batch 1, head 2) that see key 60: rows 3..6
    elif poison == "v_nan":
        v[0, 0, 62, 7] = np.nan      # column 7 of the rows of (0, 0) that see key 62: rows 5, 6
    elif poison == "v_inf":
        v[0, 3, 2, 1] = np.inf       # column 1 becomes +inf where key 2 has weight > 0
    else:
        k[1, 0, 9, 3] = np.inf       # scores +-inf: inf - inf in the softmax, NaN as in the reference
    kwargs = dict(causal="bottom_right")  # row i sees keys <= i + 57: which rows a poisoned key reaches varies
    out, lse = fusedattn.attention(q, k, v, return_lse=True, **kwargs)
    want_out, want_lse = reference_on_same_inputs(reference.attention, q, k, v, return_lse=True, **kwargs)
    assert_same_non_finite(out, want_out, "out")
    assert_same_non_finite(lse, want_lse, "lse")
    assert not np.isfinite(f64(out)).all(), "the poison must reach the output"
    finite = np.isfinite(f64(want_out))
    # The untouched rows are ordinary results: within one rounding of the reference's (also rounded) value.
    np.testing.assert_allclose(f64(out)[finite], f64(want_out)[finite], rtol=2 * eps(out.dtype),
                               atol=2 * eps(out.dtype))


@pytest.mark.parametrize("dtype_name", HALF)
def test_float16_overflow(isa, dtype_name):
    """Values above 65504 become inf in float16, exactly where the reference's do; bfloat16 keeps them."""
    dtype = half(dtype_name)
    rng = np.random.default_rng(3)
    q, k = (rng.standard_normal((1, 2, 9, 16)).astype(dtype) for _ in "qk")
    v = rng.uniform(40000, 60000, (1, 2, 9, 16)).astype(dtype)
    # Without dropout an output is a convex combination of values, so it stays <= 60000: the float32
    # accumulator (sum_j p_j v_j up to 9 * 60000 before the normalisation) must not overflow either.
    out = fusedattn.attention(q, k, v)
    assert np.isfinite(f64(out)).all() and f64(out).max() <= 60000
    # Dropout's 1 / (1 - p) = 2 pushes outputs past float16's largest value, 65504.
    kwargs = dict(dropout_p=0.5, seed=11)
    out = fusedattn.attention(q, k, v, **kwargs)
    want = reference_on_same_inputs(reference.attention, q, k, v, **kwargs)
    assert_same_non_finite(out, want, "out")
    big = f64(reference.attention(f64(q), f64(k), f64(v), **kwargs)) > 65504
    assert big.any()
    if dtype == F16:
        assert np.isposinf(f64(out)[big]).all()
    else:
        assert np.isfinite(f64(out)).all()
    # In float32 the same results are finite and accurate.
    out32 = fusedattn.attention(q, k, v, out_dtype=np.float32, **kwargs)
    np.testing.assert_allclose(out32, reference.attention(f64(q), f64(k), f64(v), **kwargs), **F32_TOL)

    # Gradients overflow the same way: with one key, dv = sum_i dout_i over 64 queries of 2048 = 131072.
    q1, k1, v1 = q[:, :, :1].repeat(64, axis=2), k[:, :, :1], (v[:, :, :1] / 1000).astype(dtype)
    out1, lse1 = fusedattn.attention(q1, k1, v1, return_lse=True)
    dout = np.full(out1.shape, 2048, dtype)
    dq, dk, dv = fusedattn.attention_backward(dout, q1, k1, v1, out1, lse1)
    ref_dv = reference_on_same_inputs(reference.attention_backward, dout, q1, k1, v1, out1, lse1)[2]
    assert_same_non_finite(dv, ref_dv, "dv")
    assert (np.isposinf(f64(dv)).all() if dtype == F16 else np.isfinite(f64(dv)).all())


# ---------------------------------------------------------------------------------------------
# KVCache and layers in 16 bits
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype_name", HALF)
def test_kv_cache_16bit(isa, dtype_name):
    dtype = half(dtype_name)
    q, k, v, _, _ = make_case(dtype_name, 23, 23, 40, "gqa")
    cache = KVCache(B, k.shape[1], max_len=32, head_dim=40, dtype=dtype)
    assert cache.dtype == dtype and cache.key_buffer.dtype == dtype and cache.value_buffer.dtype == dtype
    assert f"dtype={dtype.name}" in repr(cache)
    steps = []
    for start, stop in ((0, 9), (9, 10), (10, 11), (11, 23)):  # a prefill, two single tokens, a chunk
        cache.append(k[:, :, start:stop], v[:, :, start:stop])
        steps.append(cache.attend(q[:, :, start:stop]))
    out = np.concatenate(steps, axis=2)
    assert out.dtype == dtype
    np.testing.assert_array_equal(cache.keys, k)
    # Each step is one fused call on the cached prefix: the same numbers as the full causal call's rows.
    kwargs = dict(causal=True)
    truth = reference.attention(f64(q), f64(k), f64(v), **kwargs)
    naive = naive_attention(q, k, v, dot_scores(q, k, None), kwargs).astype(dtype)
    assert_oracle("out", out, truth, naive)
    with pytest.raises(TypeError, match=r"k_new must have dtype"):
        cache.append(f32(k[:, :, :1]), f32(v[:, :, :1]))
    with pytest.raises(TypeError, match=r"q must have dtype"):
        cache.attend(f32(q[:, :, :1]))


# The 16-bit layers round three times on the way (the in-projection, the attention output, the
# out-projection: each a float32 result rounded once, half an ulp); the rounding of q and k passes
# through the softmax with gain |scores| ~ O(1). The comparison is with a float64 layer holding the same
# 16-bit parameters on the same 16-bit inputs, so only those roundings count: normwise errors measure
# 0.15-0.75 eps16 (outputs, weights, input and parameter gradients; float16 and bfloat16). 2 eps16 leaves
# ~2.5x headroom; a projection accumulated in 16 bits (~sqrt(E) / 2 = 4 eps16 over E = 64 terms) or a
# missing rounding step in the wrong dtype fails. (The kernel itself is judged by the oracle above.)
LAYER_TOL_EPS = 2


def _layer_pair(make, dtype):
    """A 16-bit layer and a float64 layer holding exactly its (rounded) parameters."""
    layer16 = make(dtype)
    layer64 = make(np.float64)
    layer64.load_state_dict({name: f64(p) for name, p in layer16.state_dict().items()})
    return layer16, layer64


@pytest.mark.parametrize("dtype_name", HALF)
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_16bit(isa, dtype_name, batch_first):
    dtype = half(dtype_name)
    mha, ref = _layer_pair(lambda dt: MultiHeadAttention(64, 8, num_kv_heads=2, batch_first=batch_first, dtype=dt,
                                                         rng=0), dtype)
    for p in mha.state_dict().values():
        assert p.dtype == dtype
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 11, 64) if batch_first else (11, 3, 64)).astype(dtype)
    out, weights = mha(x, causal=True, need_weights=True)
    want, want_weights = ref(f64(x), causal=True, need_weights=True)
    assert out.dtype == dtype and weights.dtype == dtype and out.shape == x.shape
    tol = LAYER_TOL_EPS * eps(dtype)
    assert normwise_error(out, want) <= tol
    assert normwise_error(weights, want_weights) <= tol
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = mha.backward(dout)
    want_dx = ref.backward(f64(dout))
    assert dx.dtype == dtype and dx.shape == x.shape
    assert normwise_error(dx, want_dx) <= tol
    for name, g in mha.grads.items():
        assert g.dtype == dtype, name
        assert normwise_error(g, ref.grads[name]) <= tol, name
    # Inputs of another float dtype are cast to the layer's, as for float32 / float64 layers.
    np.testing.assert_array_equal(mha(f32(x), causal=True)[0], out)


@pytest.mark.parametrize("dtype_name", HALF)
def test_multihead_attention_16bit_cross_kdim(isa, dtype_name):
    """Separate q/k/v projections (kdim, vdim != E), cross-attention with a key-padding mask, no bias."""
    dtype = half(dtype_name)
    mha, ref = _layer_pair(lambda dt: MultiHeadAttention(32, 4, kdim=12, vdim=20, bias=False, dtype=dt, rng=1), dtype)
    rng = np.random.default_rng(6)
    query, key, value = (rng.standard_normal((2, n, f)).astype(dtype) for n, f in ((5, 32), (9, 12), (9, 20)))
    mask = np.ones((2, 1, 1, 9), bool)
    mask[1, ..., 6:] = False
    out, _ = mha(query, key, value, mask=mask)
    want, _ = ref(f64(query), f64(key), f64(value), mask=mask)
    assert out.dtype == dtype
    assert normwise_error(out, want) <= LAYER_TOL_EPS * eps(dtype)
    grads = mha.backward(np.ones_like(out))
    for g, w, x in zip(grads, ref.backward(np.ones(out.shape)), (query, key, value)):
        assert g.dtype == dtype and g.shape == x.shape
        assert normwise_error(g, w) <= LAYER_TOL_EPS * eps(dtype)


@pytest.mark.parametrize("dtype_name", HALF)
def test_additive_attention_layer_16bit(isa, dtype_name):
    dtype = half(dtype_name)
    att, ref = _layer_pair(lambda dt: AdditiveAttention(16, query_dim=8, key_dim=8, dtype=dt, rng=0), dtype)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 13, 8)).astype(dtype)
    out, weights = att(x, causal=True, need_weights=True)
    want, want_weights = ref(f64(x), causal=True, need_weights=True)
    assert out.dtype == dtype and weights.dtype == dtype
    tol = LAYER_TOL_EPS * eps(dtype)
    assert normwise_error(out, want) <= tol
    assert normwise_error(weights, want_weights) <= tol
    dx = att.backward(np.ones_like(out))
    assert dx.dtype == dtype
    assert normwise_error(dx, ref.backward(np.ones(out.shape))) <= tol
    for name, g in att.grads.items():
        assert g.dtype == dtype, name
        assert normwise_error(g, ref.grads[name]) <= tol, name
    # A lazily built 16-bit layer creates its parameters in its dtype.
    lazy = AdditiveAttention(4, dtype=dtype, rng=0)
    lazy(x)
    assert all(p.dtype == dtype for p in lazy.state_dict().values())


def test_layer_loads_bfloat16_torch_state_dict(torch):
    """torch cannot export bfloat16 tensors to NumPy; the layers widen them (exactly) first."""
    if ml_dtypes is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    torch_mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).to(torch.bfloat16)
    mha = MultiHeadAttention(16, 2, dtype=BF16)
    mha.load_state_dict(torch_mha.state_dict())
    for name, tensor in torch_mha.state_dict().items():
        np.testing.assert_array_equal(f32(mha.state_dict()[name]), tensor.float().numpy(), err_msg=name)


@pytest.mark.parametrize("make", [lambda dt: MultiHeadAttention(8, 2, dtype=dt),
                                  lambda dt: AdditiveAttention(4, dtype=dt),
                                  lambda dt: KVCache(1, 1, 4, 2, dtype=dt)], ids=["mha", "additive", "kv_cache"])
def test_16bit_dtypes_accepted_and_others_not(make):
    for name in ("float16", "bfloat16") if ml_dtypes is not None else ("float16",):
        assert make(half(name)).dtype == half(name)
    for bad in (np.complex64, np.int16, "float128"):
        with pytest.raises(TypeError, match=r"dtype must be float32 or float64 \(or 16-bit: float16, "
                                             r"ml_dtypes\.bfloat16\)"):
            make(bad)
