"""The attention variants: sliding windows, ALiBi, soft-capping, q_start / k_start and dropout.

Every feature, alone and combined, is judged against ``fusedattn.reference`` (float64 NumPy, which
materialises the scores and applies each feature by its definition) on every ISA path and in float32
and float64: forward ``out`` and ``lse``, ``attention_weights``, and the backward pass (dq, dk, dv; for
additive attention also dscore_weight). Independent checks on top of the reference:

* central finite differences of the reference forward (softcap, ALiBi, window and dropout are in the
  forward, so this judges the reference backward and the kernel alike);
* chunk consistency: attention over keys split into two chunks (``k_start``), merged by log-sum-exp,
  equals the unchunked call, and so does splitting the queries (``q_start``): each chunk gets exactly
  its part of the global causal / window / ALiBi / dropout pattern;
* dropout's keep pattern read back from the output (q = 0 and v = identity make ``out`` the pattern
  itself), against the documented hash, its keep fraction, and its independence of thread count;
* torch's SDPA with the ALiBi bias and the window given as an explicit float mask (torch has neither
  option; its dropout uses another RNG and cannot be compared).

Inputs are generated per (case, dtype) from a fixed seed, not from the per-test ``rng`` fixture, so the
float64 reference (the expensive part) is computed once and shared by the three ISA paths.
"""
from __future__ import annotations

import functools
import math
import zlib

import numpy as np
import pytest

import fusedattn
from fusedattn import reference
from fusedattn._checks import check_dropout
from fusedattn.reference import dropout_keep_factor

from conftest import TOL, make_qkv, numeric_gradients, randn

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
EPS = {np.dtype(np.float32): float(np.finfo(np.float32).eps), np.dtype(np.float64): float(np.finfo(np.float64).eps)}


def f64(x):
    return None if x is None else np.asarray(x).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------------

# Gradients are compared relative to max|expected| (see test_backward.relative_error: dS = P * (dP - Delta)
# cancels by construction, so element-wise rtol is meaningless). 2e-5 / 1e-12 are test_backward's GRAD_TOL:
# float32 accumulations over <= 300 rows or keys measure ~1e-6, float64 ~1e-15.
GRAD_TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}


def bias_allowance(dtype, bias):
    """Extra tolerance for scores of magnitude ``bias`` (the largest ALiBi penalty of a visible key).

    conftest.TOL is derived for O(1) scores. ALiBi adds -slope * |d(i) - j|, up to ~150 here (a query 300
    positions from its keys, slope 0.5); the kernel forms score - bias in the input dtype, so each score
    carries a rounding of up to eps * bias / 2, which the softmax passes to the weights (and so to out,
    lse and the gradients) as a relative error of that size. No implementation in that precision can do
    better (the shift by the row maximum does not help: it is itself of that magnitude). 4 * eps * bias is
    ~8x that bound; measured: float32 errors ~9e-6 at bias 150, where the allowance is 7e-5.
    """
    return 4.0 * EPS[np.dtype(dtype)] * bias


def additive_spread(weight):
    """The additive score's error scale, 10 + sum|w| (see test_additive.additive_tol: the kernel's tanh is
    accurate to ~1 ulp of 1, so a score's absolute error is ~eps * sum|w_d|)."""
    return 10.0 + float(np.abs(weight).sum())


def forward_tol(dtype, kind, weight, bias):
    base = TOL[np.dtype(dtype)]["atol"]
    if kind == "additive":  # test_additive.additive_tol: 2e-6 (float32) / 1e-14 (float64) per unit of spread
        base = (2e-6 if np.dtype(dtype) == np.float32 else 1e-14) * additive_spread(weight)
    t = base + bias_allowance(dtype, bias)
    return dict(atol=t, rtol=t)


def grad_tol(dtype, kind, weight, bias):
    base = GRAD_TOL[np.dtype(dtype)]
    if kind == "additive":  # test_backward.additive_grad_tol: 1e-6 / 1e-14 per unit of spread
        base = (1e-6 if np.dtype(dtype) == np.float32 else 1e-14) * additive_spread(weight)
    return base + bias_allowance(dtype, bias)


def relative_error(got, want, floor=1.0):
    """max|got - want| / max(max|want|, floor): a floor of 1 measures the rounding noise of gradients that
    vanish identically (a row with a single visible key has a constant softmax) on their natural O(1) scale."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if want.size == 0:
        return 0.0
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), floor))


def assert_grads_close(got, want, tol, names, dtype):
    assert len(got) == len(want) == len(names)
    for name, g, w in zip(names, got, want):
        assert g.shape == np.shape(w), f"{name}: shape {g.shape} != {np.shape(w)}"
        assert g.dtype == np.dtype(dtype), f"{name}: dtype {g.dtype}"
        assert np.isfinite(g).all(), f"{name}: non-finite gradient ({int((~np.isfinite(g)).sum())} elements)"
        err = relative_error(g, w)
        assert err <= tol, f"{name}: max error {err:.3g} x max|expected| exceeds {tol:.2g}"


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

# name: (shape, options). shape = (batch, Hq, Hkv, Lq, Lk, D, Dv); batch may be a tuple (several leading
# dims) or None (3-D (B, L, D) inputs, one head). Options, besides attention's own keyword arguments:
#   alibi="heads" (standard geometric slopes, shape (Hq,)), "steep" (0.5 .. 0.25, shape (Hq,)) or "batch"
#   (random in [0, 0.5), shape (..., Hq));
#   mask="bool" (random, one row and one key fully masked) or "float" (N(0, 1) with 15% -inf);
#   dropout=p (with a fixed seed); score_scale=s (q and k scaled by s, so that softcap binds).
CASES = {
    # Windows alone. Bottom-right alignment without causal; Lq = Lk makes both alignments coincide.
    "window_symmetric": ((1, 2, 1, 130, 130, 40, 24), dict(window=(16, 8))),
    "window_left_only": ((1, 2, 2, 64, 64, 64, 64), dict(window=(10, None))),
    "window_right_only": ((1, 2, 2, 64, 64, 8, 8), dict(window=(-1, 5))),
    "window_0_diagonal_only": ((1, 2, 1, 64, 64, 8, 8), dict(window=(0, 0))),
    "window_1x1": ((1, 1, 1, 1, 1, 8, 8), dict(window=(0, 0))),
    # Lq < Lk: the diagonal is i + 293 (bottom-right), so every query sees keys near the end.
    "window_lq7_lk300": ((1, 2, 1, 7, 300, 64, 40), dict(window=(50, 3))),
    # Lq > Lk: the diagonal is i - 293; rows 0..291 have an empty window (out 0, lse -inf, dq 0).
    "window_lq300_lk7_empty_rows": ((1, 2, 1, 300, 7, 40, 8), dict(window=(2, 1))),
    "window_decode_d128": ((1, 2, 2, 1, 300, 128, 64), dict(window=(64, -1))),
    # Window + causal, both alignments (right is forced to 0: the 5 must not let future keys in).
    "window_causal_top_left": ((2, 4, 2, 64, 130, 40, 24), dict(window=(30, 5), causal=True)),
    "window_causal_bottom_right": ((2, 4, 2, 64, 130, 40, 24), dict(window=(30, 5), causal="bottom_right")),
    "window_0_causal_lq_gt_lk": ((1, 2, 1, 130, 64, 8, 16), dict(window=(0, None), causal="bottom_right")),
    # ALiBi.
    "alibi_causal": ((1, 4, 4, 130, 130, 40, 40), dict(alibi="heads", causal=True)),
    "alibi_batch_slopes_lq_lt_lk": ((2, 4, 2, 7, 130, 64, 24), dict(alibi="batch")),
    # Every key 287..299 positions from the diagonal at slope 0.5: penalties ~150 (see bias_allowance).
    "alibi_lq_gt_lk_large_bias": ((1, 2, 1, 300, 7, 8, 8), dict(alibi="steep")),
    "alibi_two_lead_dims": (((2, 3), 2, 1, 20, 33, 8, 8), dict(alibi="batch", window=(8, 8))),
    "alibi_3d_inputs": ((None, None, None, 33, 40, 16, 8), dict(alibi="heads", causal="bottom_right")),
    # Combinations.
    "gqa_alibi_softcap": ((2, 8, 2, 64, 130, 40, 24), dict(alibi="heads", softcap=5.0, score_scale=2.0)),
    "window_mask_alibi": ((2, 4, 2, 64, 130, 40, 24), dict(window=(40, 10), mask="bool", alibi="batch")),
    "window_float_mask_alibi_causal": ((1, 4, 1, 130, 64, 16, 8),
                                       dict(window=(20, None), mask="float", alibi="heads", causal=True)),
    "softcap_dropout": ((2, 4, 2, 64, 130, 40, 24), dict(softcap=3.0, score_scale=2.0, dropout=0.2)),
    "dropout_causal_gqa": ((1, 4, 2, 130, 130, 8, 40), dict(dropout=0.5, causal="bottom_right")),
    "starts_causal_window": ((1, 4, 2, 64, 130, 40, 24), dict(q_start=100, k_start=40, causal=True, window=(50, None))),
    "starts_bottom_right_alibi": ((1, 2, 1, 7, 64, 64, 24),
                                  dict(q_start=300, k_start=250, causal="bottom_right", alibi="heads")),
    # Every key lies after every query: the whole call attends nothing.
    "starts_all_keys_in_future": ((1, 2, 1, 7, 64, 8, 8), dict(q_start=0, k_start=10, causal=True)),
    "everything": ((2, 4, 2, 64, 130, 40, 24),
                   dict(window=(30, 6), alibi="batch", softcap=4.0, score_scale=1.5, mask="float",
                        dropout=0.25, q_start=7, k_start=3)),
}

# The additive reference backward materialises (..., Lq, Lk, D) tanh terms: these cases are small enough.
ADDITIVE_CASES = ["window_symmetric", "window_0_diagonal_only", "window_lq7_lk300", "window_lq300_lk7_empty_rows",
                  "window_causal_top_left", "window_causal_bottom_right", "alibi_batch_slopes_lq_lt_lk",
                  "gqa_alibi_softcap", "window_mask_alibi", "softcap_dropout", "dropout_causal_gqa",
                  "starts_causal_window", "starts_all_keys_in_future", "everything"]

DROPOUT_SEED = 20240611


def alibi_slopes(hq):
    """ALiBi's geometric slopes 2^(-8 h / Hq), h = 1..Hq: powers of two for Hq | 8, exact in either dtype."""
    return 2.0 ** (-8.0 * np.arange(1, hq + 1) / hq)


@functools.lru_cache(maxsize=None)
def case_inputs(name, dtype):
    """(q, k, v, kwargs, score_weight) of a case, the same for every ISA (cached: the reference is shared)."""
    (batch, hq, hkv, lq, lk, d, dv), options = CASES[name]
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(zlib.crc32(f"{name}-{dtype.name}".encode()))
    lead = (batch,) if isinstance(batch, int) else tuple(batch or (3,))
    if hq is None:  # 3-D inputs: (B, L, D), one implicit head
        q, k, v = make_qkv(rng, lq, lk, d, dv, batch=lead, hq=None, dtype=dtype)
        heads = 1
    else:
        q, k, v = make_qkv(rng, lq, lk, d, dv, batch=lead, hq=hq, hkv=hkv, dtype=dtype)
        heads = hq
    scale = options.get("score_scale")
    if scale:
        q, k = (x * dtype.type(scale) for x in (q, k))
    own = ("alibi", "mask", "dropout", "score_scale")  # this table's options, translated below
    kwargs = {option: value for option, value in options.items() if option not in own}
    if options.get("alibi") == "heads":
        kwargs["alibi_slopes"] = alibi_slopes(heads).astype(dtype)
    elif options.get("alibi") == "steep":
        kwargs["alibi_slopes"] = np.linspace(0.5, 0.25, heads).astype(dtype)
    elif options.get("alibi") == "batch":
        # Rounded to the dtype first, so the float64 reference sees the very slopes the kernel does.
        kwargs["alibi_slopes"] = rng.uniform(0.0, 0.5, lead + (heads,)).astype(dtype)
    if options.get("mask") == "bool":
        mask = rng.random(lead + (1, lq, lk)) < 0.8
        mask[..., lq // 2, :] = False  # a fully masked row
        mask[..., :, lk // 3] = False  # a key no query may see
        kwargs["mask"] = mask
    elif options.get("mask") == "float":
        kwargs["mask"] = np.where(rng.random((lq, lk)) < 0.15, -np.inf, rng.standard_normal((lq, lk))).astype(dtype)
    if options.get("dropout"):
        kwargs.update(dropout_p=options["dropout"], seed=DROPOUT_SEED)
    weight = randn(rng, (d,), dtype)
    return q, k, v, kwargs, weight


def visibility(q, k, kwargs):
    """Bool (..., Hq, Lq, Lk): which keys each query may see (mask, causal, window, q_start / k_start).

    The reference's weights for all-zero scores and values without ALiBi, softcap and dropout: exactly
    positive where visible (equal scores are never underflowed), exactly 0 elsewhere.
    """
    kw = {name: kwargs[name] for name in ("mask", "causal", "window", "q_start", "k_start") if name in kwargs}
    return reference.attention_weights(np.zeros_like(f64(q)), np.zeros_like(f64(k)), **kw) > 0


def max_alibi_bias(q, k, kwargs):
    """The largest ALiBi penalty slope * |d(i) - j| over visible (query, key) pairs (0 without ALiBi)."""
    if "alibi_slopes" not in kwargs:
        return 0.0
    lq, lk = q.shape[-2], k.shape[-2]
    top_left = kwargs.get("causal") in (True, "top_left")
    diagonal = np.arange(lq) + kwargs.get("q_start", 0) - kwargs.get("k_start", 0) + (0 if top_left else lk - lq)
    distance = np.abs(diagonal[:, None] - np.arange(lk)[None, :])
    seen = visibility(q, k, kwargs)
    return float(np.max(np.abs(kwargs["alibi_slopes"]))) * float(np.max(np.where(seen, distance, 0), initial=0))


def functions(kind):
    if kind == "dot":
        return fusedattn.attention, fusedattn.attention_backward, reference.attention, reference.attention_backward
    return (fusedattn.additive_attention, fusedattn.additive_attention_backward, reference.additive_attention,
            reference.additive_attention_backward)


def as_f64(kwargs):
    """kwargs with float arrays (ALiBi slopes, float masks) in float64, as the float64 reference takes them."""
    return {n: (f64(x) if isinstance(x, np.ndarray) and x.dtype != np.bool_ else x) for n, x in kwargs.items()}


@functools.lru_cache(maxsize=None)
def expected(name, dtype, kind):
    """The float64 reference's results for a case, from float64 copies of the inputs: a dict of out, lse,
    grads, weights (None with dropout, which attention_weights does not take), and the dout used."""
    q, k, v, kwargs, weight = case_inputs(name, dtype)
    _, _, ref_forward, ref_backward = functions(kind)
    how = {"kind": "dot"} if kind == "dot" else {"kind": "additive", "score_weight": f64(weight)}
    extra = {} if kind == "dot" else {"score_weight": f64(weight)}
    kw = as_f64(kwargs)
    out, lse = ref_forward(f64(q), f64(k), f64(v), return_lse=True, **kw, **extra)
    dout = randn(np.random.default_rng(zlib.crc32(name.encode())), out.shape, np.dtype(dtype))
    grads = ref_backward(f64(dout), f64(q), f64(k), f64(v), out, lse, **kw, **extra)
    weights = None if "dropout_p" in kwargs else reference.attention_weights(f64(q), f64(k), **kw, **how)
    return dict(out=out, lse=lse, grads=grads, weights=weights, dout=dout, seen=visibility(q, k, kwargs),
                bias=max_alibi_bias(q, k, kwargs))


# ---------------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------------

def unseen_keys(seen, k):
    """Bool of k.shape[:-1]: the keys that no query of their kv head's group may see."""
    if k.ndim < 4:  # (B, L, D) / (L, D): one head
        return ~seen.any(axis=-2)
    hkv = k.shape[-3]
    grouped = seen.reshape(seen.shape[:-3] + (hkv, seen.shape[-3] // hkv) + seen.shape[-2:])
    return ~grouped.any(axis=(-3, -2))


def check_case(name, dtype, kind):
    q, k, v, kwargs, weight = case_inputs(name, dtype)
    forward, backward, _, _ = functions(kind)
    extra = {} if kind == "dot" else {"score_weight": weight}
    want = expected(name, dtype, kind)
    bias, seen, dout = want["bias"], want["seen"], want["dout"]

    out, lse = forward(q, k, v, return_lse=True, **kwargs, **extra)
    assert out.dtype == lse.dtype == np.dtype(dtype)
    tol = forward_tol(dtype, kind, weight, bias)
    np.testing.assert_allclose(out, want["out"], err_msg="out", **tol)
    np.testing.assert_allclose(lse, want["lse"], err_msg="lse", **tol)  # -inf must match -inf exactly

    # Rows that see no key: exactly 0 and -inf; every other row a finite lse.
    dead = ~seen.any(axis=-1)
    assert np.all(out[dead] == 0.0) and np.all(np.isneginf(lse[dead])), "a row that sees no key must give out 0, lse -inf"
    assert np.isfinite(lse[~dead]).all(), "a row that sees a key must have a finite lse"

    if "dropout_p" not in kwargs:  # attention_weights has no dropout
        how = {"kind": kind} if kind == "dot" else {"kind": kind, "score_weight": weight}
        got_w = fusedattn.attention_weights(q, k, **kwargs, **how)
        np.testing.assert_allclose(got_w, want["weights"], err_msg="attention_weights", **tol)

    grads = backward(dout, q, k, v, out, lse, **kwargs, **extra)
    names = ("dq", "dk", "dv", "dscore_weight")[:len(grads)]
    assert_grads_close(grads, want["grads"], grad_tol(dtype, kind, weight, bias), names, dtype)
    # Exact zeros where nothing flows: dq of rows that see no key, dk / dv of keys no query sees.
    dq, dk, dv = grads[:3]
    assert np.all(dq[dead] == 0.0), "dq of a row that sees no key must be exactly 0"
    unseen = unseen_keys(seen, k)
    assert np.all(dk[unseen] == 0.0) and np.all(dv[unseen] == 0.0), "a key no query may see must get zero dk / dv"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_reference(isa, name, dtype):
    check_case(name, dtype, "dot")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ADDITIVE_CASES)
def test_additive_attention_matches_reference(isa, name, dtype):
    check_case(name, dtype, "additive")


def test_causal_forces_right_window_to_zero(rng):
    # With causal, window=(L, R) means (L, 0): any R gives the same result as 0.
    q, k, v = make_qkv(rng, 40, 50, 16, batch=(1,), hq=2, dtype=np.float64)
    for causal in (True, "bottom_right"):
        want = fusedattn.attention(q, k, v, causal=causal, window=(7, 0))
        for right in (3, None, -1):
            np.testing.assert_array_equal(fusedattn.attention(q, k, v, causal=causal, window=(7, right)), want)


def test_unbounded_window_is_no_window(rng):
    # (None, None) and (-1, -1) restrict nothing: identical to no window, causal or not.
    q, k, v = make_qkv(rng, 20, 70, 16, batch=(1,), hq=2, dtype=np.float64)
    for causal in (False, True, "bottom_right"):
        want = fusedattn.attention(q, k, v, causal=causal)
        for window in ((None, None), (-1, -1), [None, -1]):
            np.testing.assert_allclose(fusedattn.attention(q, k, v, causal=causal, window=window), want,
                                       **TOL[np.dtype(np.float64)])


def test_softcap_zero_is_no_softcap(rng):
    # softcap=0 means "off" (FlashAttention's softcap=0.0 default), exactly like None.
    q, k, v = make_qkv(rng, 9, 11, 8, batch=(1,), hq=2, dtype=np.float64)
    np.testing.assert_array_equal(fusedattn.attention(q, k, v, softcap=0), fusedattn.attention(q, k, v))


# ---------------------------------------------------------------------------------------------
# Finite differences (float64): an oracle independent of any backward formula
# ---------------------------------------------------------------------------------------------

# test_backward.py derives FD_STEP / FD_TOL for central differences of O(1) losses: truncation h^2/6 |L'''|
# and rounding eps |L| / h balance near h = 1e-5, giving ~1e-10 relative error; 1e-8 keeps 30x headroom.
# Soft-capping's tanh raises |L'''| a little (its third derivative is bounded by 2 / cap^2), not enough to matter.
FD_STEP, FD_TOL = 1e-5, 1e-8

FD_CASES = {
    "softcap_alibi_window": dict(softcap=1.5, alibi_slopes=np.array([0.5, 0.125]), window=(2, 1)),
    "dropout_causal_starts": dict(dropout_p=0.4, seed=3, causal=True, q_start=2, k_start=1, window=(3, None)),
}


@functools.lru_cache(maxsize=None)
def fd_inputs(case):
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    q, k, v = make_qkv(rng, 5, 7, 4, 3, batch=(1,), hq=2, dtype=np.float64, scale=1.5)
    r = randn(rng, (1, 2, 5, 3), np.float64)
    kwargs = FD_CASES[case]

    def loss(q_, k_, v_):
        return float(np.sum(reference.attention(q_, k_, v_, **kwargs) * r))

    return q, k, v, r, kwargs, numeric_gradients(loss, (q, k, v), FD_STEP)


@pytest.mark.parametrize("case", list(FD_CASES))
def test_backward_matches_finite_differences(isa, case):
    q, k, v, r, kwargs, numeric = fd_inputs(case)
    out, lse = fusedattn.attention(q, k, v, return_lse=True, **kwargs)
    got = fusedattn.attention_backward(r, q, k, v, out, lse, **kwargs)
    assert_grads_close(got, numeric, FD_TOL, ("dq", "dk", "dv"), np.float64)


# ---------------------------------------------------------------------------------------------
# Chunks: q_start / k_start give each call exactly its part of the global pattern
# ---------------------------------------------------------------------------------------------

def merge(out_a, lse_a, out_b, lse_b):
    """Attention over keys A and B from the attentions over A and over B (each normalised by its own lse)."""
    lse = np.logaddexp(lse_a, lse_b)
    safe = np.where(np.isneginf(lse), 0.0, lse)[..., None]  # a row that neither chunk attends: weights 0, out 0
    return np.exp(lse_a[..., None] - safe) * out_a + np.exp(lse_b[..., None] - safe) * out_b, lse


CHUNK_Q_START, CHUNK_LQ, CHUNK_LK, CHUNK_SPLIT = 200, 70, 260, 180
CHUNK_MODES = {
    # Top-left: d(i) = i + q_start - k_start in global positions, whatever the chunk's length. Query rows
    # 200..269 see keys [pos - 64, pos]; rows past 243 see nothing of chunk A (lse -inf there, merged away).
    "causal_window_alibi": dict(causal=True, window=(64, None)),
    "causal_window_alibi_dropout": dict(causal=True, window=(64, None), dropout_p=0.3, seed=77),
    # Without causal the alignment is bottom-right: d(i) gains this call's Lk - Lq. A key chunk [a, b) then
    # needs q_start + (Lk - (b - a)), the keys after it, to put its diagonal where the global one is (see
    # chunk_q_start). q_start also positions dropout, so this mode is compared without dropout.
    "bidirectional_window_alibi": dict(window=(20, 12)),
}


def chunk_q_start(mode, q_start, lk_chunk):
    return q_start if CHUNK_MODES[mode].get("causal") else q_start + CHUNK_LK - lk_chunk


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", list(CHUNK_MODES))
def test_key_chunks_merge_to_the_whole(isa, rng, dtype, mode):
    q, k, v = make_qkv(rng, CHUNK_LQ, CHUNK_LK, 32, 16, batch=(1,), hq=4, hkv=2, dtype=dtype)
    q_start = CHUNK_Q_START if CHUNK_MODES[mode].get("causal") else 0
    kwargs = dict(CHUNK_MODES[mode], alibi_slopes=alibi_slopes(4).astype(dtype))
    whole, whole_lse = fusedattn.attention(q, k, v, q_start=q_start, return_lse=True, **kwargs)
    assert np.isfinite(whole_lse).all()
    s = CHUNK_SPLIT
    parts = [fusedattn.attention(q, k[..., a:b, :], v[..., a:b, :], k_start=a, return_lse=True,
                                 q_start=chunk_q_start(mode, q_start, b - a), **kwargs)
             for a, b in ((0, s), (s, CHUNK_LK))]
    # Both chunks must matter, or the test proves little: some rows attend each, some rows only one.
    assert np.isfinite(parts[0][1]).any() and np.isfinite(parts[1][1]).any()
    assert np.isneginf(parts[0][1]).any() or np.isneginf(parts[1][1]).any()
    out, lse = merge(*(f64(x) for part in parts for x in part))
    tol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(out, whole, err_msg="merged out", **tol)
    np.testing.assert_allclose(lse, whole_lse, err_msg="merged lse", **tol)

    # Backward by chunks (ring-attention style): each chunk's backward, given the *global* out and lse,
    # yields its own dk / dv and its share of dq.
    dout = randn(rng, whole.shape, dtype)
    want = fusedattn.attention_backward(dout, q, k, v, whole, whole_lse, q_start=q_start, **kwargs)
    got = [fusedattn.attention_backward(dout, q, k[..., a:b, :], v[..., a:b, :], whole, whole_lse, k_start=a,
                                        q_start=chunk_q_start(mode, q_start, b - a), **kwargs)
           for a, b in ((0, s), (s, CHUNK_LK))]
    assembled = (f64(got[0][0]) + f64(got[1][0]), np.concatenate([got[0][1], got[1][1]], axis=-2),
                 np.concatenate([got[0][2], got[1][2]], axis=-2))
    assert_grads_close([x.astype(dtype) for x in assembled], want, GRAD_TOL[np.dtype(dtype)], ("dq", "dk", "dv"), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_query_chunks_concatenate_to_the_whole(isa, rng, dtype):
    # Top-left alignment (causal=True): queries [a, b) are the call with q_start = q_start + a.
    q, k, v = make_qkv(rng, CHUNK_LQ, CHUNK_LK, 32, 16, batch=(2,), hq=4, hkv=2, dtype=dtype)
    kwargs = dict(causal=True, window=(64, None), alibi_slopes=alibi_slopes(4).astype(dtype), softcap=3.0,
                  dropout_p=0.3, seed=5)
    whole, whole_lse = fusedattn.attention(q, k, v, q_start=CHUNK_Q_START, return_lse=True, **kwargs)
    parts = [fusedattn.attention(q[..., a:b, :], k, v, q_start=CHUNK_Q_START + a, return_lse=True, **kwargs)
             for a, b in ((0, 33), (33, CHUNK_LQ))]
    tol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts], axis=-2), whole, **tol)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts], axis=-1), whole_lse, **tol)


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------

def keep_pattern(p, seed, *, lq=256, lk=256, b=1, hq=4, q_start=0, k_start=0, dtype=np.float32, num_threads=None):
    """Dropout's factors Z (0 or 1 / (1 - p)), read back from the kernel's output.

    q = k = 0 give every key the weight 1 / Lk, and v = I (Dv = Lk) makes out[i, j] = Z_ij / Lk.
    """
    q = np.zeros((b, hq, lq, 8), dtype)
    k = np.zeros((b, hq, lk, 8), dtype)
    v = np.ascontiguousarray(np.broadcast_to(np.eye(lk, dtype=dtype), (b, hq, lk, lk)))
    out = fusedattn.attention(q, k, v, dropout_p=p, seed=seed, q_start=q_start, k_start=k_start,
                              num_threads=num_threads)
    return out.astype(np.float64) * lk


def documented_pattern(p, seed, *, lq=256, lk=256, b=1, hq=4, q_start=0, k_start=0):
    """The same factors from the documented hash (fusedattn.reference.dropout_keep_factor)."""
    positions = {"dropout_p": p, "seed": seed, "q_start": q_start, "k_start": k_start}
    batch_head = np.arange(b * hq).reshape(b, hq, 1, 1)
    return dropout_keep_factor(positions, batch_head, np.arange(lq)[:, None], np.arange(lk)[None, :])


def within_binomial(count, n, prob, sigmas=5.0):
    """|count / n - prob| within ``sigmas`` standard deviations of a binomial(n, prob) proportion."""
    return abs(count / n - prob) <= sigmas * math.sqrt(prob * (1 - prob) / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_pattern_is_the_documented_hash(isa, p):
    z = keep_pattern(p, 1234, q_start=1000, k_start=77)
    want = documented_pattern(p, 1234, q_start=1000, k_start=77)
    # Exactly the reference's pattern (which keys are dropped), and the kept ones scaled by 1 / (1 - p):
    # out = (1/Lk) * Z * Lk is exact up to the rounding of 1 / Lk and 1 / (1 - p) (rtol 1e-5 >> eps32).
    np.testing.assert_array_equal(z > 0.5, want > 0)
    np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_fraction_and_independence(p):
    # 4 heads x 256 x 256 = 262144 Bernoulli(1 - p) draws, if the hash is any good. Each statistic must lie
    # within 5 sigma of its binomial expectation (a deterministic check: the seed is fixed; at 5 sigma a
    # correct hash fails one such check in ~2 million). A hash that ignored the head, query or key index
    # would give the neighbours' joint keep rate 1 - p instead of (1 - p)^2.
    kept = keep_pattern(p, 99) > 0.5
    n, keep = kept.size, 1 - p
    assert within_binomial(kept.sum(), n, keep), f"keep fraction {kept.mean():.4f}, expected {keep}"
    for h, head in enumerate(kept[0]):
        assert within_binomial(head.sum(), head.size, keep), f"head {h}: keep fraction {head.mean():.4f}"
    neighbours = {"adjacent keys": (kept[..., :-1], kept[..., 1:]),
                  "adjacent queries": (kept[..., :-1, :], kept[..., 1:, :]),
                  "adjacent heads": (kept[:, :-1], kept[:, 1:])}
    for name, (a, b) in neighbours.items():
        both = np.logical_and(a, b)
        assert within_binomial(both.sum(), both.size, keep * keep), (
            f"{name}: joint keep rate {both.mean():.4f}, expected {keep * keep:.4f}")


def test_dropout_is_a_function_of_positions(isa):
    # A sub-block of queries and keys, called alone with its global q_start / k_start, draws exactly the
    # factors of the same positions in the whole call.
    whole = keep_pattern(0.4, 8, lq=256, lk=256, q_start=50, k_start=20)
    part = keep_pattern(0.4, 8, lq=100, lk=128, q_start=50 + 70, k_start=20 + 96)
    np.testing.assert_array_equal(part > 0.5, whole[..., 70:170, 96:224] > 0.5)


@pytest.mark.parametrize("shape", [dict(lq=256, lk=256, d=64, hq=4, hkv=2), dict(lq=1, lk=4096, d=64, hq=8, hkv=2)],
                         ids=["prefill", "decode"])
def test_dropout_is_the_same_at_any_thread_count(isa, rng, shape):
    # Big enough (>= 2^20 multiply-adds) to run multi-threaded; the decode shape splits its keys between
    # threads. The forward may sum in another order (tolerance), but a different pattern would move
    # outputs by O(1); the backward is documented bit-identical at any thread count.
    q, k, v = make_qkv(rng, shape["lq"], shape["lk"], shape["d"], batch=(1,), hq=shape["hq"], hkv=shape["hkv"])
    kwargs = dict(dropout_p=0.3, seed=42, alibi_slopes=alibi_slopes(shape["hq"]).astype(np.float32))
    out, lse = fusedattn.attention(q, k, v, return_lse=True, num_threads=1, **kwargs)
    dout = randn(rng, out.shape)
    grads = fusedattn.attention_backward(dout, q, k, v, out, lse, num_threads=1, **kwargs)
    for threads in (2, 3):
        np.testing.assert_allclose(fusedattn.attention(q, k, v, num_threads=threads, **kwargs), out,
                                   err_msg=f"num_threads={threads}", **TOL[np.dtype(np.float32)])
        again = fusedattn.attention_backward(dout, q, k, v, out, lse, num_threads=threads, **kwargs)
        for name, a, b in zip(("dq", "dk", "dv"), grads, again):
            assert a.tobytes() == b.tobytes(), f"{name} differs at num_threads={threads}"
    z = {threads: keep_pattern(0.3, 42, num_threads=threads) > 0.5 for threads in (1, 2, 3)}
    np.testing.assert_array_equal(z[2], z[1])
    np.testing.assert_array_equal(z[3], z[1])


def test_dropout_seeds(rng):
    q, k, v = make_qkv(rng, 64, 64, 16, batch=(1,), hq=2)
    out1 = fusedattn.attention(q, k, v, dropout_p=0.5, seed=1)
    # The same seed: the same output, bit for bit; another seed: another output (by O(1), not rounding).
    np.testing.assert_array_equal(fusedattn.attention(q, k, v, dropout_p=0.5, seed=1), out1)
    assert np.max(np.abs(fusedattn.attention(q, k, v, dropout_p=0.5, seed=2) - out1)) > 0.1
    # Patterns of two seeds disagree on about 2 p (1 - p) = half of the positions.
    z1, z2 = keep_pattern(0.5, 1) > 0.5, keep_pattern(0.5, 2) > 0.5
    assert within_binomial(np.sum(z1 != z2), z1.size, 0.5)
    # A Generator seed draws one int (as check_dropout does); seeds above 2^32 use their high bits too.
    drawn = check_dropout(0.5, np.random.default_rng(3))["seed"]
    np.testing.assert_array_equal(fusedattn.attention(q, k, v, dropout_p=0.5, seed=np.random.default_rng(3)),
                                  fusedattn.attention(q, k, v, dropout_p=0.5, seed=drawn))
    assert not np.array_equal(keep_pattern(0.5, 5), keep_pattern(0.5, 5 + 2**32))
    # Without a seed each call draws a fresh one.
    assert not np.array_equal(fusedattn.attention(q, k, v, dropout_p=0.5), fusedattn.attention(q, k, v, dropout_p=0.5))
    # dropout_p = 0 ignores the seed; the lse is that of the scores, before dropout.
    np.testing.assert_array_equal(fusedattn.attention(q, k, v, dropout_p=0.0, seed=9), fusedattn.attention(q, k, v))
    _, lse = fusedattn.attention(q, k, v, dropout_p=0.5, seed=1, return_lse=True)
    np.testing.assert_allclose(lse, fusedattn.attention(q, k, v, return_lse=True)[1], **TOL[np.dtype(np.float32)])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_vjp_with_generator_seed_matches_reference(isa, rng, dtype):
    q, k, v = make_qkv(rng, 40, 70, 16, 8, batch=(2,), hq=4, hkv=2, dtype=dtype)
    kwargs = dict(dropout_p=0.3, causal=True, window=(30, None), alibi_slopes=alibi_slopes(4).astype(dtype),
                  softcap=4.0)
    out, backward = fusedattn.attention_vjp(q, k, v, seed=np.random.default_rng(11), **kwargs)
    # The int the vjp drew: check_dropout on a generator in the same state draws the same one.
    drawn = check_dropout(0.3, np.random.default_rng(11))["seed"]
    want_out, lse = fusedattn.attention(q, k, v, seed=drawn, return_lse=True, **kwargs)
    np.testing.assert_array_equal(out, want_out)
    dout = randn(rng, out.shape, dtype)
    got = backward(dout)
    want = reference.attention_backward(f64(dout), f64(q), f64(k), f64(v), f64(out), f64(lse), seed=drawn,
                                        **as_f64(kwargs))
    assert_grads_close(got, want, GRAD_TOL[np.dtype(dtype)], ("dq", "dk", "dv"), dtype)


def test_vjp_without_seed_uses_one_mask_for_both_passes():
    # No seed: the vjp draws one and must give it to both passes. With q = k = 0 and v = I, out = P o Z
    # (P = 1 / Lk everywhere), so dv = (P o Z)^T dout = out^T dout whatever seed was drawn.
    lk = 64
    q, k = np.zeros((1, 2, 48, 8)), np.zeros((1, 2, lk, 8))
    v = np.ascontiguousarray(np.broadcast_to(np.eye(lk), (1, 2, lk, lk)))
    out, backward = fusedattn.attention_vjp(q, k, v, dropout_p=0.5)
    assert 0 < np.count_nonzero(out) < out.size  # some dropped, some kept
    dout = np.random.default_rng(0).standard_normal(out.shape)
    np.testing.assert_allclose(backward(dout)[2], np.swapaxes(out, -1, -2) @ dout, **TOL[np.dtype(np.float64)])


# The reference takes valid inputs only (issue #14): errors are the public function's, which validates
# before computing. Without the extension these pass once the fallback is routed through validation.
@pytest.mark.parametrize("fn", [fusedattn.attention_backward, fusedattn.additive_attention_backward],
                         ids=["attention_backward", "additive_attention_backward"])
def test_backward_with_dropout_needs_the_seed(fn):
    q = k = v = np.ones((1, 2, 5, 4), np.float32)
    out, lse = fusedattn.attention(q, k, v, dropout_p=0.2, seed=1, return_lse=True)
    with pytest.raises(ValueError, match=r"^seed is required"):
        fn(np.ones_like(out), q, k, v, out, lse, dropout_p=0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lq", [1, 7])
def test_additive_dropout_backward_few_queries(isa, dtype, lq):
    # Fewer queries than one SIMD register of them: the kernel pads the query lanes of its tile. Their
    # dropout factors must be defined too (0), or 0 * garbage = NaN leaks into dk and dscore_weight, which
    # sum over every lane. Freed NaN-filled blocks are put on the heap first so that uninitialised scratch
    # memory reliably holds NaN, instead of whatever the previous test left there.
    rng = np.random.default_rng(lq)
    q, k, v = make_qkv(rng, lq, 64, 8, 8, batch=(1,), hq=2, dtype=dtype)
    w = randn(rng, (8,), dtype)
    kwargs = dict(dropout_p=0.3, seed=0, score_weight=w)
    out, lse = fusedattn.additive_attention(q, k, v, return_lse=True, num_threads=1, **kwargs)
    dout = randn(rng, out.shape, dtype)
    poison = [np.full(n, np.nan, t) for t in (np.float32, np.float64) for n in (64, 256, 1024, 4096, 16384, 65536)
              for _ in range(4)]
    del poison
    got = fusedattn.additive_attention_backward(dout, q, k, v, out, lse, num_threads=1, **kwargs)
    want = reference.additive_attention_backward(f64(dout), f64(q), f64(k), f64(v), f64(out), f64(lse),
                                                 **as_f64(kwargs))
    assert_grads_close(got, want, grad_tol(dtype, "additive", w, 0.0), ("dq", "dk", "dv", "dscore_weight"), dtype)


# ---------------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------------

# (id, kwargs, exception, regex the message must match: it names the argument)
ERRORS = [
    ("window_negative_left", dict(window=(-2, 0)), ValueError, r"^window left must be >= 0"),
    ("window_negative_right", dict(window=(0, -5)), ValueError, r"^window right must be >= 0"),
    ("window_three", dict(window=(1, 2, 3)), ValueError, r"^window must be a pair"),
    ("window_one", dict(window=(4,)), ValueError, r"^window must be a pair"),
    ("window_int", dict(window=4), ValueError, r"^window must be a pair"),
    ("window_float", dict(window=(1.5, 0)), TypeError, r"^window left must be an int"),
    ("window_bool", dict(window=(0, True)), TypeError, r"^window right must be an int"),
    ("window_str", dict(window=("8", 0)), TypeError, r"^window left must be an int"),
    ("alibi_wrong_heads", dict(alibi_slopes=np.ones(3)), ValueError, r"^alibi_slopes must have shape"),
    ("alibi_wrong_batch", dict(alibi_slopes=np.ones((3, 4))), ValueError, r"^alibi_slopes must have shape"),
    ("alibi_per_row", dict(alibi_slopes=np.ones((2, 4, 5))), ValueError, r"^alibi_slopes must have shape"),
    ("alibi_scalar", dict(alibi_slopes=0.5), ValueError, r"^alibi_slopes must have shape"),
    ("alibi_bool", dict(alibi_slopes=np.ones(4, bool)), TypeError, r"^alibi_slopes must be a real-valued"),
    ("alibi_complex", dict(alibi_slopes=np.ones(4, complex)), TypeError, r"^alibi_slopes must be a real-valued"),
    ("alibi_str", dict(alibi_slopes=["a"] * 4), TypeError, r"^alibi_slopes must be a real-valued"),
    ("softcap_negative", dict(softcap=-1.0), ValueError, r"^softcap must be positive"),
    ("softcap_nan", dict(softcap=float("nan")), ValueError, r"^softcap must be positive and finite"),
    ("softcap_inf", dict(softcap=float("inf")), ValueError, r"^softcap must be positive and finite"),
    ("softcap_str", dict(softcap="2"), TypeError, r"^softcap must be a positive number"),
    ("softcap_bool", dict(softcap=True), TypeError, r"^softcap must be a positive number"),
    ("q_start_negative", dict(q_start=-1), ValueError, r"^q_start must be >= 0"),
    ("k_start_negative", dict(k_start=-3), ValueError, r"^k_start must be >= 0"),
    ("q_start_float", dict(q_start=1.0), TypeError, r"^q_start must be an int"),
    ("k_start_none", dict(k_start=None), TypeError, r"^k_start must be an int"),
]
DROPOUT_ERRORS = [
    ("dropout_one", dict(dropout_p=1.0, seed=1), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("dropout_negative", dict(dropout_p=-0.1, seed=1), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("dropout_nan", dict(dropout_p=float("nan"), seed=1), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("dropout_str", dict(dropout_p="0.1", seed=1), TypeError, r"^dropout_p must be a float"),
    ("dropout_bool", dict(dropout_p=True, seed=1), TypeError, r"^dropout_p must be a float"),
    ("seed_float", dict(dropout_p=0.1, seed=1.5), TypeError, r"^seed must be an int or a numpy.random.Generator"),
    ("seed_str", dict(dropout_p=0.1, seed="1"), TypeError, r"^seed must be an int"),
    ("seed_random_state", dict(dropout_p=0.1, seed=np.random.RandomState(0)), TypeError, r"^seed must be an int"),
    ("seed_negative", dict(dropout_p=0.1, seed=-1), ValueError, r"^seed must be in \[0, 2\*\*64\)"),
    ("seed_too_big", dict(dropout_p=0.1, seed=2**64), ValueError, r"^seed must be in \[0, 2\*\*64\)"),
]


def _error_inputs():
    rng = np.random.default_rng(0)
    q, k, v = make_qkv(rng, 5, 7, 8, 6, batch=(2,), hq=4, hkv=2)
    out, lse = fusedattn.attention(q, k, v, return_lse=True)
    return q, k, v, out, lse


def _call(fn, kwargs):
    q, k, v, out, lse = _error_inputs()
    if fn in ("attention_backward", "additive_attention_backward"):
        return getattr(fusedattn, fn)(np.ones_like(out), q, k, v, out, lse, **kwargs)
    if fn == "attention_weights":
        return fusedattn.attention_weights(q, k, **kwargs)
    return getattr(fusedattn, fn)(q, k, v, **kwargs)


# The reference takes valid inputs only (issue #14): errors are the public function's, which validates
# before computing. Without the extension these pass once the fallback is routed through validation.
FORWARD_FNS = ["attention", "additive_attention", "attention_vjp", "attention_backward", "additive_attention_backward"]


@pytest.mark.parametrize("fn", FORWARD_FNS + ["attention_weights"])
@pytest.mark.parametrize("case, kwargs, exc, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_position_arguments(fn, case, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        _call(fn, kwargs)


@pytest.mark.parametrize("fn", FORWARD_FNS)
@pytest.mark.parametrize("case, kwargs, exc, message", DROPOUT_ERRORS, ids=[e[0] for e in DROPOUT_ERRORS])
def test_bad_dropout_arguments(fn, case, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        _call(fn, kwargs)


# ---------------------------------------------------------------------------------------------
# torch: ALiBi and windows as an explicit float mask
# ---------------------------------------------------------------------------------------------

# Both sides carry their own rounding against the truth (each within GRAD_TOL / conftest.TOL), so their
# difference gets twice that, plus the ALiBi allowance for the bias magnitudes (<= ~20 here).
TORCH_CASES = {
    # Bottom-right window around the diagonal i + 51, GQA, an explicit scale.
    "window_alibi_gqa_scale": (dict(lq=19, lk=70, hq=8, hkv=2), dict(window=(10, 4), scale=0.3)),
    # Top-left causal in global positions (queries 30.., keys 10..), per-batch slopes. Every row sees a key
    # (torch's gradients of fully masked rows are not comparable).
    "causal_window_starts_batch_slopes": (dict(lq=40, lk=64, hq=4, hkv=4),
                                          dict(causal=True, window=(16, None), q_start=30, k_start=10)),
}


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is not installed (optional: pip install torch==2.13.0)")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_alibi_and_window_match_torch_float_mask(isa, rng, torch, dtype, case):
    shape, kwargs = TORCH_CASES[case]
    b = 2
    q, k, v = make_qkv(rng, shape["lq"], shape["lk"], 32, 24, batch=(b,), hq=shape["hq"], hkv=shape["hkv"], dtype=dtype)
    slopes = (rng.uniform(0.05, 0.5, (b, shape["hq"])) if case.endswith("batch_slopes")
              else alibi_slopes(shape["hq"])).astype(dtype)
    kwargs = dict(kwargs, alibi_slopes=slopes)
    # The float mask torch gets: -slope * |d(i) - j| where visible, -inf elsewhere.
    lq, lk = shape["lq"], shape["lk"]
    top_left = kwargs.get("causal") in (True, "top_left")
    diagonal = np.arange(lq) + kwargs.get("q_start", 0) - kwargs.get("k_start", 0) + (0 if top_left else lk - lq)
    distance = np.abs(diagonal[:, None] - np.arange(lk)[None, :]).astype(np.float64)
    seen = visibility(q, k, kwargs)
    assert seen.any(axis=-1).all()
    bias = -f64(slopes).reshape(slopes.shape[:-1] + (-1, 1, 1)) * distance
    mask = np.where(seen, np.broadcast_to(bias, seen.shape), -np.inf).astype(dtype)

    out, lse = fusedattn.attention(q, k, v, return_lse=True, **kwargs)
    dout = randn(rng, out.shape, dtype)
    grads = fusedattn.attention_backward(dout, q, k, v, out, lse, **kwargs)

    leaves = [torch.from_numpy(x).requires_grad_(True) for x in (q, k, v)]
    theirs = torch.nn.functional.scaled_dot_product_attention(
        *leaves, attn_mask=torch.from_numpy(mask), scale=kwargs.get("scale"), enable_gqa=shape["hq"] != shape["hkv"])
    theirs.backward(torch.from_numpy(dout))
    allowance = bias_allowance(dtype, float(np.max(np.where(seen, -np.broadcast_to(bias, seen.shape), 0))))
    t = 2 * TOL[np.dtype(dtype)]["atol"] + allowance
    np.testing.assert_allclose(out, theirs.detach().numpy(), atol=t, rtol=t)
    assert_grads_close(grads, [x.grad.numpy() for x in leaves], 2 * GRAD_TOL[np.dtype(dtype)] + allowance,
                       ("dq", "dk", "dv"), dtype)
