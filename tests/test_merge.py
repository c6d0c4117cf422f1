"""merge_attention: attention over disjoint key chunks, merged by logsumexp, equals one call over all keys.

Every chunk is a real kernel call (on every ISA path, float32 and float64) at its global positions
(``q_start`` / ``k_start``), so the tests also pin down the position model a sequence-parallel caller
relies on: causal in both alignments, a sliding window, ALiBi and a bool mask, with splits into 1..5
uneven chunks, some empty and some fully masked for every row.

Tolerances: conftest's (float32 2e-5, float64 1e-12), against the one call over all keys. Both results
are the same sums evaluated in a different order: the merge adds one convex combination of the chunk
outputs (coefficients in [0, 1] summing to 1, so at most ~(n + 2) eps * max|out| of rounding, ~1e-6 in
float32 for n = 5) on top of the chunk calls' own rounding, which is of the same size as the one call's.
``test_merge_adds_no_error`` measures this against the float64 reference.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import fusedattn
from fusedattn import reference
from fusedattn.merge import merge_attention

from conftest import HALF_DTYPE_PARAMS, assert_dead_rows, make_qkv, randn, tol

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
LQ, LK = 40, 180

# Chunk boundaries over the LK keys: 1..5 chunks, uneven, with empty chunks (a:a) and single keys.
SPLITS = {
    "k1": (0, LK),
    "k2_uneven": (0, 7, LK),
    "k3_empty": (0, 60, 60, LK),
    "k4_single_keys": (0, 1, 100, 101, LK),
    "k5_empty_first": (0, 0, 33, 90, 170, LK),
}


def alibi_slopes(h):
    return np.array([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)])


def _mode_inputs(mode, rng, dtype):
    """(q, k, v, kwargs of the one call, kwargs of the chunk calls, q_start of the chunk calls)."""
    q, k, v = make_qkv(rng, LQ, LK, 16, 12, batch=(2,), hq=4, hkv=2, dtype=dtype)
    if mode == "causal_top_left":
        # Queries at positions 0..39: every key chunk past position 39 is fully masked for every row.
        return q, k, v, dict(causal=True), dict(causal=True), 0
    if mode == "causal_bottom_right":
        # Queries are the last 40 of 180 positions: the whole call's bottom-right diagonal is top-left
        # alignment at q_start = Lk - Lq, in global positions, for every chunk.
        return q, k, v, dict(causal="bottom_right"), dict(causal=True), LK - LQ
    if mode == "sliding_window":
        # Each query sees the 24 keys up to itself: early chunks are outside every row's window.
        kw = dict(causal=True, window=(23, None))
        return q, k, v, dict(kw, q_start=LK - LQ), kw, LK - LQ
    if mode == "alibi_bidirectional":
        # No causal: the alignment is bottom-right per call, handled by the chunk's q_start (see below).
        kw = dict(alibi_slopes=alibi_slopes(4).astype(dtype), window=(50, 9))
        return q, k, v, kw, kw, 0
    if mode == "bool_mask":
        mask = rng.random((2, 1, LQ, LK)) < 0.7
        mask[:, :, ::3, 60:] = False  # rows 0, 3, 6, ... see only the first 60 keys
        mask[:, :, 1, :] = False      # row 1 sees nothing at all
        return q, k, v, dict(mask=mask), dict(mask=mask), 0
    raise AssertionError(mode)


MODES = ["causal_top_left", "causal_bottom_right", "sliding_window", "alibi_bidirectional", "bool_mask"]


def chunk_call(q, k, v, a, b, kwargs, q_start):
    """attention over keys [a, b) at their global positions, as a sequence-parallel worker would call it."""
    kwargs = dict(kwargs)
    if "mask" in kwargs:
        kwargs["mask"] = kwargs["mask"][..., a:b]
    if not kwargs.get("causal"):
        # Without causal (or with causal="bottom_right") the call adds its own Lk - Lq to the diagonal; the
        # whole call adds LK - LQ. Shift q_start by the difference so the diagonal lands on the global one.
        q_start = q_start + (LK - LQ) - ((b - a) - LQ)  # >= 0: a chunk has at most LK keys
    return fusedattn.attention(q, k[..., a:b, :], v[..., a:b, :], q_start=q_start, k_start=a, return_lse=True,
                               **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("split", list(SPLITS))
def test_chunks_merge_to_one_call(isa, rng, dtype, mode, split):
    q, k, v, whole_kw, chunk_kw, q_start = _mode_inputs(mode, rng, dtype)
    whole, whole_lse = fusedattn.attention(q, k, v, return_lse=True, **whole_kw)
    bounds = SPLITS[split]
    parts = [chunk_call(q, k, v, a, b, chunk_kw, q_start) for a, b in zip(bounds[:-1], bounds[1:])]
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    assert out.dtype == dtype and lse.dtype == dtype
    assert out.shape == whole.shape and lse.shape == whole_lse.shape
    np.testing.assert_allclose(out, whole, err_msg="merged out", **tol(dtype))
    np.testing.assert_allclose(lse, whole_lse, err_msg="merged lse", **tol(dtype))
    assert_dead_rows(out, lse, whole_lse)
    if len(parts) > 2 and mode in ("causal_top_left", "sliding_window"):
        # These splits have a chunk beyond every row's diagonal / before every row's window: wholly -inf.
        assert any(np.isneginf(p[1]).all() for p in parts)


def test_the_modes_have_dead_chunks_and_dead_rows(rng):
    """Guard on the fixtures above: whole chunks that no row attends, and rows that attend nothing."""
    q, k, v, _, chunk_kw, q_start = _mode_inputs("causal_top_left", rng, np.float32)
    _, lse = chunk_call(q, k, v, 60, LK, chunk_kw, q_start)
    assert np.isneginf(lse).all()
    q, k, v, _, chunk_kw, q_start = _mode_inputs("sliding_window", rng, np.float32)
    _, lse = chunk_call(q, k, v, 0, 60, chunk_kw, q_start)
    assert np.isneginf(lse).all()
    q, k, v, whole_kw, _, _ = _mode_inputs("bool_mask", rng, np.float32)
    _, lse = fusedattn.attention(q, k, v, return_lse=True, **whole_kw)
    assert np.isneginf(lse[:, :, 1]).all() and np.isfinite(lse[:, :, 0]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_query_and_key_chunks_2d_grid(isa, rng, dtype):
    """Both axes chunked, causal bottom-right: each query block merges its own key chunks."""
    q, k, v = make_qkv(rng, 50, 120, 8, 8, batch=(), hq=None, dtype=dtype)  # 2-D (L, D) inputs
    whole = fusedattn.attention(q, k, v, causal="bottom_right")
    rows = []
    for qa, qb in ((0, 17), (17, 50)):
        parts = [fusedattn.attention(q[qa:qb], k[a:b], v[a:b], causal=True, q_start=120 - 50 + qa, k_start=a,
                                     return_lse=True) for a, b in ((0, 40), (40, 41), (41, 120))]
        rows.append(merge_attention([p[0] for p in parts], [p[1] for p in parts])[0])
    np.testing.assert_allclose(np.concatenate(rows), whole, **tol(dtype))


def test_merge_adds_no_error(rng):
    """float32: the merged result is as close to the float64 truth as the one call is.

    Weights are computed in float64 and the convex combination in float32 (see merge.py): its rounding
    (<= (n + 2) eps * max|out|, ~5e-7 here) must not show next to the kernel's own error (~5e-7, measured).
    """
    q, k, v = make_qkv(rng, 64, 2048, 64, batch=(1,), hq=4, dtype=np.float32)
    truth, truth_lse = reference.attention(*(x.astype(np.float64) for x in (q, k, v)), return_lse=True)
    whole, whole_lse = fusedattn.attention(q, k, v, return_lse=True)
    bounds = np.linspace(0, 2048, 9).astype(int)
    parts = [fusedattn.attention(q, k[..., a:b, :], v[..., a:b, :], return_lse=True, k_start=a)
             for a, b in zip(bounds[:-1], bounds[1:])]
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    eps = float(np.finfo(np.float32).eps)
    err_whole, err_merged = np.abs(whole - truth).max(), np.abs(out - truth).max()
    assert err_merged <= 2 * err_whole + 10 * eps * np.abs(truth).max(), (err_merged, err_whole)
    assert np.abs(lse - truth_lse).max() <= 2 * np.abs(whole_lse - truth_lse).max() + 4 * eps * np.abs(truth_lse).max()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_single_part_is_returned_exactly_as_a_new_array(rng, dtype):
    q, k, v = make_qkv(rng, 9, 13, 8, dtype=dtype)
    o, lse = fusedattn.attention(q, k, v, return_lse=True, mask=rng.random((9, 13)) < 0.3)
    out, lse2 = merge_attention([o], [lse])
    # One part has weight exp(0) / 1 = 1 exactly (0 on dead rows, whose output is 0 anyway).
    np.testing.assert_array_equal(out, o)
    np.testing.assert_array_equal(lse2, lse)
    assert not np.shares_memory(out, o) and not np.shares_memory(lse2, lse)


@pytest.mark.parametrize("dtype", HALF_DTYPE_PARAMS)
def test_16bit_parts(rng, dtype):
    """16-bit outputs come with float32 lse; the merge accumulates in float32 and rounds once to 16 bits.

    Judged against the float64 truth, relative to the one call's error, which is the final rounding to 16
    bits (half an ulp of the largest output; the kernel itself computes in float32):
    * float32 partials (out_dtype=float32), merged and rounded once: the same ~1e-7 float32 value rounded
      the same way: exactly as accurate as the one call (measured equal), allowed 1.1x;
    * 16-bit partials: each part is rounded, then the merged sum again: measured ~1.8x, allowed 3x.
    """
    q, k, v = (x.astype(dtype) for x in make_qkv(rng, 20, 90, 16, batch=(1,), hq=2))
    truth = reference.attention(*(x.astype(np.float64) for x in (q, k, v)), causal="bottom_right")
    whole, whole_lse = fusedattn.attention(q, k, v, causal="bottom_right", return_lse=True)
    err_whole = np.abs(whole.astype(np.float64) - truth).max()
    assert err_whole > 0
    for out_dtype, factor in ((np.float32, 1.1), (None, 3.0)):
        parts = [fusedattn.attention(q, k[..., a:b, :], v[..., a:b, :], causal=True, q_start=70, k_start=a,
                                     return_lse=True, out_dtype=out_dtype) for a, b in ((0, 31), (31, 90))]
        out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
        assert lse.dtype == np.float32 and out.dtype == (dtype if out_dtype is None else np.float32)
        err = np.abs(out.astype(dtype).astype(np.float64) - truth).max()
        assert err <= factor * err_whole, (out_dtype, err, err_whole)
        np.testing.assert_allclose(lse, whole_lse, **tol(np.float32))


# ---------------------------------------------------------------------------------------------
# Stability, dead rows and NaN
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("base", [1e4, -1e4, 0.0], ids=["huge", "tiny", "zero"])
def test_extreme_lse_is_stable(rng, dtype, base):
    """exp(1e4) overflows and exp(-1e4) underflows in both dtypes: only differences of lse may be used."""
    o1, o2, o3 = (randn(rng, (3, 5, 4), dtype) for _ in range(3))
    l1 = np.full((3, 5), base, dtype)
    l2 = (l1.astype(np.float64) + math.log(3.0)).astype(dtype)
    l3 = np.full((3, 5), -np.inf, dtype)
    out, lse = merge_attention([o1, o2, o3], [l1, l2, l3])
    w2 = np.exp(l2.astype(np.float64) - l1.astype(np.float64))[..., None]  # 3, up to the rounding of l2
    want = (o1.astype(np.float64) + w2 * o2) / (1 + w2)
    want_lse = l1.astype(np.float64) + np.log1p(w2[..., 0])
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    np.testing.assert_allclose(out, want, **tol(dtype))
    # lse ~ 1e4 carries float32 rounding of ~1e4 * eps ~ 1e-3: compare relative to its size.
    np.testing.assert_allclose(lse, want_lse, rtol=4 * np.finfo(dtype).eps, atol=tol(dtype)["atol"])


def test_huge_scores_through_the_kernel(isa, rng):
    """Scores ~1e4 (lse ~1e4) from real calls, in float64: merged equals one call.

    The chunk calls see the very same scores as the one call, so out and lse differ only by the rounding
    of the running max and sums: ~eps * |lse| ~ 1e-12 in lse and relatively in out, far below 1e-9.
    """
    q, k, v = make_qkv(rng, 16, 300, 32, batch=(1,), hq=2, dtype=np.float64, scale=30.0)
    whole, whole_lse = fusedattn.attention(q, k, v, return_lse=True)
    assert np.abs(whole_lse).max() > 1e3
    parts = [fusedattn.attention(q, k[..., a:b, :], v[..., a:b, :], return_lse=True) for a, b in ((0, 100), (100, 300))]
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    np.testing.assert_allclose(out, whole, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(lse, whole_lse, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_all_dead_rows_give_zero_and_minus_inf(dtype):
    outs = [np.zeros((2, 3, 4), dtype), np.zeros((2, 3, 4), dtype)]
    lses = [np.full((2, 3), -np.inf, dtype), np.full((2, 3), -np.inf, dtype)]
    lses[1][0, 1] = 0.5
    outs[1][0, 1] = 7.0
    out, lse = merge_attention(outs, lses)
    assert np.isneginf(lse).sum() == 5 and lse[0, 1] == dtype(0.5)
    np.testing.assert_array_equal(out[0, 1], 7.0)
    assert np.all(out[np.isneginf(lse)] == 0) and not np.isnan(out).any()


def test_dead_part_contributes_nothing_even_if_its_output_is_not_finite(rng):
    o1, o2 = randn(rng, (4, 3)), randn(rng, (4, 3))
    l1, l2 = randn(rng, (4,)), np.full(4, -np.inf, np.float32)
    o2[:2] = np.nan
    o2[2:] = np.inf
    out, lse = merge_attention([o1, o2], [l1, l2])
    np.testing.assert_array_equal(out, o1)
    np.testing.assert_array_equal(lse, l1)


def test_nan_propagates(rng):
    o1, o2 = randn(rng, (4, 3)), randn(rng, (4, 3))
    l1, l2 = randn(rng, (4,)), randn(rng, (4,))
    l2[0] = np.nan    # a NaN lse poisons its row: out and lse
    o1[1, 2] = np.nan  # a NaN in a contributing output poisons that element
    out, lse = merge_attention([o1, o2], [l1, l2])
    assert np.isnan(lse[0]) and np.isnan(out[0]).all()
    assert np.isnan(out[1, 2]) and np.isfinite(out[1, :2]).all() and np.isfinite(lse[1])
    assert np.isfinite(out[2:]).all() and np.isfinite(lse[2:]).all()


def test_nan_query_through_the_kernel_matches_one_call(rng):
    q, k, v = make_qkv(rng, 6, 30, 8)
    q[1, 2, 3, 0] = np.nan
    whole, whole_lse = fusedattn.attention(q, k, v, return_lse=True)
    parts = [fusedattn.attention(q, k[..., a:b, :], v[..., a:b, :], return_lse=True) for a, b in ((0, 11), (11, 30))]
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    assert np.isnan(out[1, 2, 3]).all()
    np.testing.assert_allclose(out, whole, equal_nan=True, **tol(np.float32))
    np.testing.assert_allclose(lse, whole_lse, equal_nan=True, **tol(np.float32))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def _pair(shape=(2, 3, 4), dtype=np.float32):
    return np.zeros(shape, dtype), np.zeros(shape[:-1], dtype)


@pytest.mark.parametrize(("outs", "lses", "exc", "match"), [
    ([], [], ValueError, "at least one"),
    ([_pair()[0]], [_pair()[1]] * 2, ValueError, "same length"),
    ([_pair()[0], _pair((2, 3, 5))[0]], [_pair()[1]] * 2, ValueError, r"outs\[1\] has shape \(2, 3, 5\)"),
    ([_pair()[0]], [np.zeros((2, 4), np.float32)], ValueError, r"lses\[0\] must have shape \(2, 3\)"),
    ([_pair()[0]], [np.zeros((2, 3, 4), np.float32)], ValueError, r"lses\[0\] must have shape"),
    ([_pair()[0], _pair(dtype=np.float64)[0]], [_pair()[1]] * 2, TypeError, r"outs\[1\] has dtype float64"),
    ([_pair()[0]], [_pair(dtype=np.float64)[1]], TypeError, r"lses\[0\] has dtype float64"),
    ([np.zeros((2, 3), np.int64)], [np.zeros(2, np.int64)], TypeError, "float32, float64, float16 or bfloat16, got int64"),
    ([np.zeros((2, 3), np.float16)], [np.zeros(2, np.float16)], TypeError, "float16 need lse in float32"),
    ([np.float32(1.0)], [np.float32(0.0)], ValueError, "at least 1 dimension"),
    (_pair()[0], _pair()[1], TypeError, "sequences of arrays"),
    (3, [1], TypeError, "sequences of arrays"),
], ids=["empty", "length", "out_shape", "lse_shape", "lse_rank", "out_dtype", "lse_dtype", "int", "float16_lse",
        "scalar", "ndarray", "not_iterable"])
def test_errors(outs, lses, exc, match):
    with pytest.raises(exc, match=match):
        merge_attention(outs, lses)


def test_accepts_generators_and_lists(rng):
    o, lse = fusedattn.attention(*make_qkv(rng, 5, 7, 4), return_lse=True)
    out, _ = merge_attention((x for x in [o, o]), iter([lse, lse]))
    np.testing.assert_allclose(out, o, **tol(np.float32))
    out, _ = merge_attention([o.tolist()], [lse.tolist()])  # nested lists become float64 arrays
    assert out.dtype == np.float64
