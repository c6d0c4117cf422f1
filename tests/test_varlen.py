"""Packed variable-length attention (issue 6): ``attention_varlen``, its backward, and ``masks.BlockDiagonal``.

Oracles, on every ISA path, in float32 and float64:

* ``reference.attention_varlen`` / ``reference.attention_varlen_backward``: float64 NumPy, one sequence
  at a time, each feature (causal, window, ALiBi, soft-capping, dropout) applied by its definition;
* the dense :func:`fusedattn.attention` looped over the sequences: an independent route through the
  kernel, which knows nothing of cu_seqlens, so per-sequence lengths, diagonals (bottom-right alignment
  uses *each sequence's* ``Lk - Lq``) and ALiBi slopes must come out the same;
* for ``BlockDiagonal`` with the dense API: dense attention with the materialised bool mask (non-causal:
  the mask has no causal part), and ``attention_varlen`` on the same memory (causal), which runs the very
  same packed kernel on the very same strides and so must agree bit for bit;

plus thread-count determinism of the backward pass, the ``out=`` argument, non-contiguous packed inputs
and the argument checks (cu_seqlens, max_seqlen, BlockDiagonal totals and batch).

Sequences deliberately include every edge the packed kernel has: length 0 (no rows at all), 1, 7 (less
than a SIMD width), 64 (a tile), 130 (two tiles plus a tail), Lq != Lk within a sequence, a sequence with
queries but no keys (its rows attend nothing: out exactly 0, lse exactly -inf) and one with keys but no
queries (those keys get dk = dv = 0 exactly). Bottom-right causal on a sequence with Lq > Lk leaves its
first Lq - Lk rows with nothing to attend.

Inputs are built per (case, dtype) from a fixed seed and cached, so the float64 reference (the expensive
part) is computed once and shared by the three ISA paths.
"""
from __future__ import annotations

import functools
import zlib

import numpy as np
import pytest

import fusedattn
from fusedattn import reference
from fusedattn.masks import BlockDiagonal

from conftest import TOL

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
EPS = {np.dtype(np.float32): float(np.finfo(np.float32).eps), np.dtype(np.float64): float(np.finfo(np.float64).eps)}

HQ, HKV, D, DV = 4, 2, 32, 24  # GQA (2 query heads per kv head), Dv != D so that a swapped axis shows

# (q lengths, k lengths). "equal": Lq == Lk per sequence (self-attention of a packed batch), "ragged":
# Lq != Lk everywhere: (64, 1) and (130, 64) have Lq > Lk, (0, 3) keys without queries, (5, 0) queries
# without keys.
SEQLENS = {
    "equal": ([0, 1, 7, 64, 130], [0, 1, 7, 64, 130]),
    "ragged": ([1, 7, 64, 130, 0, 5], [7, 130, 1, 64, 3, 0]),
}

# Gradients are compared relative to max|expected| (see test_backward.relative_error: dS = P * (dP - Delta)
# cancels by construction, so an element-wise rtol is meaningless). test_backward's GRAD_TOL: float32
# accumulations over <= 300 rows or keys measure ~1e-6, float64 ~1e-15.
GRAD_TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}

ALIBI_MAX_SLOPE = 0.1


def bias_allowance(dtype, bias):
    """Extra tolerance for ALiBi penalties up to ``bias`` (test_variants.bias_allowance's argument).

    The kernel forms score - slope * distance in the compute dtype, so each score carries a rounding of
    up to eps * bias / 2, which the softmax passes on as a relative error of that size; 4 * eps * bias
    is ~8x that bound. Here bias <= 0.1 * 130 = 13: 6e-6 in float32, 1.2e-14 in float64.
    """
    return 4.0 * EPS[np.dtype(dtype)] * bias


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _slopes(option, batch):
    rng = np.random.default_rng(_seed("slopes", option, batch))
    if option == "alibi_heads":
        return rng.uniform(0.01, ALIBI_MAX_SLOPE, HQ)
    return rng.uniform(0.01, ALIBI_MAX_SLOPE, (batch, HQ))  # per-sequence slopes


# Keyword arguments of each feature, applied per sequence. Slopes are filled in per SEQLENS entry.
OPTIONS = {
    "plain": {},
    "scale": dict(scale=0.37),
    "causal_top_left": dict(causal=True),
    "causal_bottom_right": dict(causal="bottom_right"),
    "window": dict(window=(5, 3)),                          # bottom-right aligned band, both sides bounded
    "window_causal": dict(window=(9, None), causal="bottom_right"),
    "alibi_heads": dict(alibi_slopes="heads"),
    "alibi_batch": dict(alibi_slopes="batch"),
    "softcap": dict(softcap=2.0, scale=0.8),
    "everything": dict(causal="bottom_right", window=(20, None), alibi_slopes="batch", softcap=3.0),
}
BACKWARD_OPTIONS = ["plain", "causal_top_left", "causal_bottom_right", "window", "alibi_batch", "softcap",
                    "everything"]


def _kwargs(option, batch):
    kwargs = dict(OPTIONS[option])
    if "alibi_slopes" in kwargs:
        kwargs["alibi_slopes"] = _slopes("alibi_" + kwargs["alibi_slopes"], batch)
    return kwargs


def _tol(dtype, kwargs):
    t = TOL[np.dtype(dtype)]["atol"]
    if "alibi_slopes" in kwargs:
        t += bias_allowance(dtype, ALIBI_MAX_SLOPE * max(max(SEQLENS[name][1]) for name in SEQLENS))
    return dict(atol=t, rtol=t)


@functools.lru_cache(maxsize=None)
def packed_inputs(lens, dtype_name):
    """Standard-normal packed q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), dout, cu_seqlens.

    Read-only: they are shared by every test of the same (lens, dtype).
    """
    lens_q, lens_k = SEQLENS[lens]
    dtype = np.dtype(dtype_name)
    rng = np.random.default_rng(_seed("packed", lens, dtype_name))
    tq, tk = sum(lens_q), sum(lens_k)
    arrays = [rng.standard_normal(shape).astype(dtype)
              for shape in ((tq, HQ, D), (tk, HKV, D), (tk, HKV, DV), (tq, HQ, DV))]
    for x in arrays:
        x.flags.writeable = False
    return (*arrays, _cu(lens_q), _cu(lens_k))


@functools.lru_cache(maxsize=None)
def reference_forward(lens, dtype_name, option, dropout=False):
    q, k, v, _, cu_q, cu_k = packed_inputs(lens, dtype_name)
    kwargs = _kwargs(option, len(SEQLENS[lens][0]))
    if dropout:
        kwargs.update(dropout_p=0.3, seed=1234)
    return reference.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kwargs)


def relative_error(got, want, floor=1.0):
    """``max|got - want| / max(max|want|, floor)`` (test_backward.relative_error)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if want.size == 0:
        return 0.0
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), floor))


def assert_dead_rows(out, lse, ref_lse):
    """Rows that attend nothing: out exactly 0, lse exactly -inf; every other row a finite lse."""
    dead = np.isneginf(ref_lse)  # (Hq, total_q)
    assert np.all(out.swapaxes(0, 1)[dead] == 0.0), "a row that attends nothing must give exactly 0"
    assert np.all(np.isneginf(lse[dead])), "a row that attends nothing must give lse == -inf"
    assert np.isfinite(lse[~dead]).all(), "a row that attends some key must have a finite lse"


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lens", list(SEQLENS))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_forward_matches_reference(isa, dtype, lens, option):
    q, k, v, _, cu_q, cu_k = packed_inputs(lens, np.dtype(dtype).name)
    kwargs = _kwargs(option, cu_q.size - 1)
    ref_out, ref_lse = reference_forward(lens, np.dtype(dtype).name, option)
    out, lse = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kwargs)
    # FlashAttention's layout: out like q with Dv, lse (Hq, total_q), in the compute dtype.
    assert out.shape == (q.shape[0], HQ, DV) and out.dtype == dtype
    assert lse.shape == (HQ, q.shape[0]) and lse.dtype == dtype
    np.testing.assert_allclose(out, ref_out, **_tol(dtype, kwargs))
    np.testing.assert_allclose(lse, ref_lse, **_tol(dtype, kwargs))
    assert_dead_rows(out, lse, ref_lse)
    # The output alone is the same computation.
    np.testing.assert_allclose(fusedattn.attention_varlen(q, k, v, cu_q, cu_k, **kwargs), out, **TOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lens", list(SEQLENS))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_forward_matches_dense_per_sequence(isa, dtype, lens, option):
    """Each sequence's rows equal a dense call on that sequence alone (its own Lq, Lk, diagonal, slopes)."""
    q, k, v, _, cu_q, cu_k = packed_inputs(lens, np.dtype(dtype).name)
    kwargs = _kwargs(option, cu_q.size - 1)
    out, lse = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kwargs)
    for b in range(cu_q.size - 1):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        dense_kwargs = dict(kwargs)
        slopes = kwargs.get("alibi_slopes")
        if slopes is not None and slopes.ndim == 2:
            dense_kwargs["alibi_slopes"] = slopes[b]
        # (L, H, D) rows of the packed arrays -> (1, H, L, D) views: the dense kernel's own layout.
        want_out, want_lse = fusedattn.attention(*(x[rows].swapaxes(0, 1)[None] for x, rows in
                                                   ((q, rows_q), (k, rows_k), (v, rows_k))),
                                                 return_lse=True, **dense_kwargs)
        np.testing.assert_allclose(out[rows_q].swapaxes(0, 1), want_out[0], err_msg=f"sequence {b}",
                                   **_tol(dtype, kwargs))
        np.testing.assert_allclose(lse[:, rows_q], want_lse[0], err_msg=f"sequence {b}", **_tol(dtype, kwargs))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lens", list(SEQLENS))
def test_dropout_matches_reference(isa, dtype, lens):
    """Same seed, same keep mask: the reference regenerates the kernel's hash with the sequence as batch index."""
    q, k, v, _, cu_q, cu_k = packed_inputs(lens, np.dtype(dtype).name)
    ref_out, ref_lse = reference_forward(lens, np.dtype(dtype).name, "plain", dropout=True)
    out, lse = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=0.3, seed=1234, return_lse=True)
    np.testing.assert_allclose(out, ref_out, **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(lse, ref_lse, **TOL[np.dtype(dtype)])  # lse is taken before dropout
    # Dropout changed something (p = 0.3 over thousands of weights), and another seed changes it again.
    assert not np.allclose(out, reference_forward(lens, np.dtype(dtype).name, "plain")[0], **TOL[np.dtype(dtype)])
    other = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=0.3, seed=1235)
    assert not np.allclose(other, out, **TOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_int32_cu_seqlens_and_max_seqlen(isa, dtype):
    q, k, v, _, cu_q, cu_k = packed_inputs("ragged", np.dtype(dtype).name)
    want = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, causal="bottom_right")
    lens_q, lens_k = SEQLENS["ragged"]
    for kwargs in (dict(max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k)),       # exactly the longest
                   dict(max_seqlen_q=max(lens_q) + 100, max_seqlen_k=10_000)):    # an upper bound is fine too
        got = fusedattn.attention_varlen(q, k, v, cu_q.astype(np.int32), cu_k.astype(np.int32),
                                         causal="bottom_right", **kwargs)
        np.testing.assert_array_equal(got, want)
    # Plain lists are converted like arrays.
    np.testing.assert_array_equal(
        fusedattn.attention_varlen(q, k, v, cu_q.tolist(), cu_k.tolist(), causal="bottom_right"), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_out_argument(isa, dtype):
    q, k, v, _, cu_q, cu_k = packed_inputs("ragged", np.dtype(dtype).name)
    want, want_lse = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    out = np.full(want.shape, np.nan, dtype)  # NaN: every element must be written, dead rows included
    assert fusedattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True, out=out) is out
    np.testing.assert_array_equal(out, want)
    # A non-contiguous out: the (total, Hq, Dv) view of an (Hq, total, Dv) buffer, with return_lse.
    buffer = np.full((HQ, q.shape[0], DV), np.nan, dtype)
    res, lse = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True, out=buffer.swapaxes(0, 1), return_lse=True)
    assert np.shares_memory(res, buffer)
    np.testing.assert_allclose(buffer.swapaxes(0, 1), want, **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(lse, want_lse, **TOL[np.dtype(dtype)])


def test_out_argument_errors():
    q, k, v, _, cu_q, cu_k = packed_inputs("equal", "float32")
    good = np.zeros((q.shape[0], HQ, DV), np.float32)  # np.empty may hold a signalling NaN: astype() below warns
    read_only = good.copy()
    read_only.flags.writeable = False
    qv = np.zeros((q.shape[0], HQ, D), np.float32)  # D != DV, so an overlapping out needs its own q
    bad = [
        (np.empty((q.shape[0], HQ, D), np.float32), r"\bout\b.*shape"),
        (good.astype(np.float64), r"\bout\b.*float32"),
        (read_only, r"\bout\b.*writeable"),
    ]
    for out, pattern in bad:
        with pytest.raises((ValueError, TypeError), match=pattern):
            fusedattn.attention_varlen(q, k, v, cu_q, cu_k, out=out)
    with pytest.raises(ValueError, match=r"out must not overlap q"):
        fusedattn.attention_varlen(qv, qv[:, :HKV], qv[:, :HKV], cu_q, cu_q, out=qv)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous_inputs(isa, dtype):
    """Packed arrays are read through their strides: transposed, strided along tokens, heads-major."""
    q, k, v, _, cu_q, cu_k = packed_inputs("ragged", np.dtype(dtype).name)
    q_t = np.ascontiguousarray(q.transpose(0, 2, 1)).transpose(0, 2, 1)   # from a (total, D, Hq) array
    k_s = np.repeat(k, 2, axis=0)[::2]                                      # every other row of a bigger array
    v_h = np.ascontiguousarray(v.swapaxes(0, 1)).swapaxes(0, 1)             # from an (Hkv, total, Dv) array
    assert not (q_t.flags.c_contiguous or k_s.flags.c_contiguous or v_h.flags.c_contiguous)
    kwargs = dict(causal="bottom_right", window=(20, None), softcap=3.0)
    out, lse = fusedattn.attention_varlen(q_t, k_s, v_h, cu_q, cu_k, return_lse=True, **kwargs)
    want_out, want_lse = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kwargs)
    np.testing.assert_allclose(out, want_out, **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(lse, want_lse, **TOL[np.dtype(dtype)])
    ref_out, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kwargs)
    np.testing.assert_allclose(out, ref_out, **TOL[np.dtype(dtype)])
    # The gradients too, returned in the packed (contiguous) layout.
    grads = fusedattn.attention_varlen_backward(np.ones_like(out), q_t, k_s, v_h, out, lse, cu_q, cu_k, **kwargs)
    want_grads = fusedattn.attention_varlen_backward(np.ones_like(out), q, k, v, out, lse, cu_q, cu_k, **kwargs)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        assert relative_error(g, w) <= GRAD_TOL[np.dtype(dtype)], name


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lens", list(SEQLENS))
@pytest.mark.parametrize("option", BACKWARD_OPTIONS + ["dropout"])
def test_backward_matches_reference(isa, dtype, lens, option):
    q, k, v, dout, cu_q, cu_k = packed_inputs(lens, np.dtype(dtype).name)
    kwargs = _kwargs("causal_bottom_right" if option == "dropout" else option, cu_q.size - 1)
    if option == "dropout":
        kwargs.update(dropout_p=0.3, seed=99)
    out, lse = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kwargs)
    grads = fusedattn.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **kwargs)
    want = reference.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **kwargs)
    tol = GRAD_TOL[np.dtype(dtype)] + _tol(dtype, kwargs)["atol"] - TOL[np.dtype(dtype)]["atol"]
    for name, g, w, x in zip(("dq", "dk", "dv"), grads, want, (q, k, v)):
        assert g.shape == x.shape and g.dtype == dtype, name
        assert np.isfinite(g).all(), f"{name}: non-finite gradient"
        err = relative_error(g, w)
        assert err <= tol, f"{name}: max error {err:.3g} x max|expected| exceeds {tol:.1g}"
    # Exact zeros: rows that attend nothing get dq = 0; keys of a sequence without queries get dk = dv = 0.
    dead = np.isneginf(lse).T  # (total_q, Hq)
    assert np.all(grads[0][dead] == 0.0)
    lens_q, lens_k = SEQLENS[lens]
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        if lq == 0 and lk:
            assert np.all(grads[1][cu_k[b]:cu_k[b + 1]] == 0.0) and np.all(grads[2][cu_k[b]:cu_k[b + 1]] == 0.0)


@pytest.mark.parametrize("lens", list(SEQLENS))
@pytest.mark.parametrize("option", ["causal_bottom_right", "everything", "dropout"])
def test_backward_bit_identical_across_threads(isa, lens, option):
    q, k, v, dout, cu_q, cu_k = packed_inputs(lens, "float32")
    kwargs = dict(dropout_p=0.2, seed=5, causal=True) if option == "dropout" else _kwargs(option, cu_q.size - 1)
    out, lse = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kwargs)
    one = fusedattn.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, num_threads=1, **kwargs)
    for n in (2, 3):
        many = fusedattn.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, num_threads=n, **kwargs)
        for name, a, b in zip(("dq", "dk", "dv"), one, many):
            np.testing.assert_array_equal(b, a, err_msg=f"{name} differs between 1 and {n} threads")


# ---------------------------------------------------------------------------------------------
# BlockDiagonal with the dense API
# ---------------------------------------------------------------------------------------------

# A sequence with keys but no queries, one with queries but no keys, and tile-crossing lengths.
BD_Q, BD_K = [3, 0, 70, 9, 4], [5, 2, 66, 9, 0]


def dense_inputs(rank, dtype, hq=HQ, hkv=HKV):
    """q (1, Hq, total_q, D) / (1, total_q, D) / (total_q, D), k and v likewise, and dout like out."""
    rng = np.random.default_rng(_seed("dense", rank, np.dtype(dtype).name))
    tq, tk = sum(BD_Q), sum(BD_K)
    if rank == 4:
        shapes = ((1, hq, tq, D), (1, hkv, tk, D), (1, hkv, tk, DV), (1, hq, tq, DV))
    elif rank == 3:
        shapes = ((1, tq, D), (1, tk, D), (1, tk, DV), (1, tq, DV))
    else:
        shapes = ((tq, D), (tk, D), (tk, DV), (tq, DV))
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def as_packed(x, rank):
    """The (total, H, D) view of a dense (1, H, total, D) / (1, total, D) / (total, D) array (same memory)."""
    if rank == 4:
        return x[0].swapaxes(0, 1)
    return x.reshape(x.shape[-2:])[:, None, :]


def lse_as_packed(lse, rank):
    return lse[0] if rank == 4 else lse.reshape(1, -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rank", [4, 3, 2])
def test_block_diagonal_equals_materialized_mask(isa, dtype, rank):
    q, k, v, dout = dense_inputs(rank, dtype)
    mask = BlockDiagonal.from_seqlens(BD_Q, BD_K)
    dense_mask = mask.materialize()
    assert dense_mask.shape == (sum(BD_Q), sum(BD_K)) and dense_mask.dtype == np.bool_
    out, lse = fusedattn.attention(q, k, v, mask=mask, return_lse=True)
    want_out, want_lse = fusedattn.attention(q, k, v, mask=dense_mask, return_lse=True)
    assert out.shape == want_out.shape and lse.shape == want_lse.shape and out.dtype == dtype
    np.testing.assert_allclose(out, want_out, **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(lse, want_lse, **TOL[np.dtype(dtype)])
    ref_out, ref_lse = reference.attention(q, k, v, mask=mask, return_lse=True)
    np.testing.assert_allclose(out, ref_out, **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(lse, ref_lse, **TOL[np.dtype(dtype)])
    # Backward: the packed kernel's gradients equal the dense masked kernel's.
    grads = fusedattn.attention_backward(dout, q, k, v, out, lse, mask=mask)
    want = fusedattn.attention_backward(dout, q, k, v, want_out, want_lse, mask=dense_mask)
    for name, g, w, x in zip(("dq", "dk", "dv"), grads, want, (q, k, v)):
        assert g.shape == x.shape and g.dtype == dtype, name
        assert relative_error(g, w) <= GRAD_TOL[np.dtype(dtype)], name


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rank", [4, 3, 2])
@pytest.mark.parametrize("causal", [True, "bottom_right"])
def test_block_diagonal_causal_equals_varlen(isa, dtype, rank, causal):
    """Causal applies per sequence; on the same memory the dense call *is* the varlen call, bit for bit."""
    q, k, v, dout = dense_inputs(rank, dtype)
    mask = BlockDiagonal.from_seqlens(BD_Q, BD_K)
    packed = [as_packed(x, rank) for x in (q, k, v, dout)]
    out, lse = fusedattn.attention(q, k, v, mask=mask, causal=causal, return_lse=True)
    want_out, want_lse = fusedattn.attention_varlen(*packed[:3], mask.cu_seqlens_q, mask.cu_seqlens_k,
                                                    causal=causal, return_lse=True)
    np.testing.assert_array_equal(as_packed(out, rank), want_out)
    np.testing.assert_array_equal(lse_as_packed(lse, rank), want_lse)
    ref_out, ref_lse = reference.attention(q, k, v, mask=mask, causal=causal, return_lse=True)
    np.testing.assert_allclose(out, ref_out, **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(lse, ref_lse, **TOL[np.dtype(dtype)])

    grads = fusedattn.attention_backward(dout, q, k, v, out, lse, mask=mask, causal=causal)
    want = fusedattn.attention_varlen_backward(packed[3], *packed[:3], want_out, want_lse, mask.cu_seqlens_q,
                                               mask.cu_seqlens_k, causal=causal)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want):
        np.testing.assert_array_equal(as_packed(g, rank), w, err_msg=name)
    # attention_vjp passes the mask through to its backward.
    vjp_out, backward = fusedattn.attention_vjp(q, k, v, mask=mask, causal=causal)
    np.testing.assert_array_equal(vjp_out, out)
    for name, g, w in zip(("dq", "dk", "dv"), backward(dout), grads):
        np.testing.assert_array_equal(g, w, err_msg=f"attention_vjp {name}")


def test_block_diagonal_dropout_alibi_window(isa):
    """The other per-sequence features reach the packed kernel through the dense API too."""
    q, k, v, _ = dense_inputs(4, np.float64)
    mask = BlockDiagonal.from_seqlens(BD_Q, BD_K)
    slopes = _slopes("alibi_batch", len(BD_Q))
    kwargs = dict(causal="bottom_right", window=(7, None), alibi_slopes=slopes, softcap=2.5, dropout_p=0.25, seed=3)
    out = fusedattn.attention(q, k, v, mask=mask, **kwargs)
    want = fusedattn.attention_varlen(*(as_packed(x, 4) for x in (q, k, v)), mask.cu_seqlens_q, mask.cu_seqlens_k,
                                      **kwargs)
    np.testing.assert_array_equal(as_packed(out, 4), want)
    np.testing.assert_allclose(out, reference.attention(q, k, v, mask=mask, **kwargs), **TOL[np.dtype(np.float64)])


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------

_Q = np.zeros((8, 2, 4), np.float32)
_K = np.zeros((10, 1, 4), np.float32)
_CU_Q, _CU_K = np.array([0, 3, 8]), np.array([0, 6, 10])


def _varlen(**changes):
    args = dict(q=_Q, k=_K, v=_K, cu_seqlens_q=_CU_Q, cu_seqlens_k=_CU_K)
    args.update(changes)
    positional = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")
    kwargs = {name: args.pop(name) for name in list(args) if name not in positional}
    return lambda fn: fn(args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"], **kwargs)


VARLEN_ERRORS = [
    ("not_monotone", _varlen(cu_seqlens_q=np.array([0, 5, 3, 8])), ValueError, r"cu_seqlens_q.*non-decreasing"),
    ("not_from_zero", _varlen(cu_seqlens_k=np.array([1, 6, 10])), ValueError, r"cu_seqlens_k must start at 0, got 1"),
    ("wrong_last_q", _varlen(cu_seqlens_q=np.array([0, 3, 7])), ValueError, r"cu_seqlens_q must end at .*8, got 7"),
    ("wrong_last_k", _varlen(cu_seqlens_k=np.array([0, 6, 11])), ValueError, r"cu_seqlens_k must end at .*10, got 11"),
    ("float_dtype", _varlen(cu_seqlens_q=np.array([0.0, 3.0, 8.0])), TypeError,
     r"cu_seqlens_q must have dtype int32 or int64"),
    ("uint_dtype", _varlen(cu_seqlens_k=np.array([0, 6, 10], np.uint64)), TypeError,
     r"cu_seqlens_k must have dtype int32"),
    ("two_dim", _varlen(cu_seqlens_k=np.array([[0, 6, 10]])), ValueError, r"cu_seqlens_k must be a 1-D array"),
    ("empty", _varlen(cu_seqlens_q=np.array([], np.int64)), ValueError, r"cu_seqlens_q must be a 1-D array"),
    ("batch_mismatch", _varlen(cu_seqlens_k=np.array([0, 2, 6, 10])), ValueError,
     r"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got 2 and 3"),
    ("max_seqlen_q", _varlen(max_seqlen_q=4), ValueError, r"max_seqlen_q=4 is smaller than the longest sequence \(5\)"),
    ("max_seqlen_k", _varlen(max_seqlen_k=5), ValueError, r"max_seqlen_k=5 is smaller than the longest sequence \(6\)"),
    ("max_seqlen_float", _varlen(max_seqlen_k=6.0), TypeError, r"max_seqlen_k must be an int"),
    ("q_not_packed", _varlen(q=_Q[None]), ValueError, r"\bq\b must be packed as \(total, heads, dim\)"),
    ("v_not_packed", _varlen(v=_K[:, 0]), ValueError, r"\bv\b must be packed as \(total, heads, dim\)"),
    ("gqa", _varlen(q=np.zeros((8, 3, 4), np.float32), k=np.zeros((10, 2, 4), np.float32),
                    v=np.zeros((10, 2, 4), np.float32)), ValueError, r"multiple of the number of key/value heads"),
    ("alibi_shape", _varlen(alibi_slopes=np.ones((3, 2))), ValueError,
     r"alibi_slopes must have shape \(2,\) or \(2, 2\)"),
    ("mixed_dtypes", _varlen(k=_K.astype(np.float64)), TypeError, r"q, k and v must share one dtype"),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in VARLEN_ERRORS], ids=[c[0] for c in VARLEN_ERRORS])
def test_varlen_errors(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(fusedattn.attention_varlen)
    # The backward pass validates its packing the same way (before looking at dout / out / lse).
    dout, lse = np.zeros((8, 2, 4), np.float32), np.zeros((2, 8), np.float32)

    def backward(q, k, v, cu_q, cu_k, **kwargs):
        return fusedattn.attention_varlen_backward(dout, q, k, v, dout, lse, cu_q, cu_k, **kwargs)

    with pytest.raises(exc, match=pattern):
        call(backward)


def test_varlen_backward_errors():
    out, lse = fusedattn.attention_varlen(_Q, _K, _K, _CU_Q, _CU_K, return_lse=True)
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 8\)"):
        fusedattn.attention_varlen_backward(out, _Q, _K, _K, out, lse.T, _CU_Q, _CU_K)
    with pytest.raises(ValueError, match=r"dout must have shape \(8, 2, 4\)"):
        fusedattn.attention_varlen_backward(out[:4], _Q, _K, _K, out, lse, _CU_Q, _CU_K)
    with pytest.raises(ValueError, match=r"seed is required"):
        fusedattn.attention_varlen_backward(out, _Q, _K, _K, out, lse, _CU_Q, _CU_K, dropout_p=0.1)


_BD_Q = np.zeros((1, 2, 8, 4), np.float32)


@pytest.mark.parametrize("make,call,exc,pattern", [
    (lambda: BlockDiagonal.from_seqlens([3, 4]), lambda m: fusedattn.attention(_BD_Q, _BD_Q, _BD_Q, mask=m),
     ValueError, r"mask is BlockDiagonal\(q_seqlens=\[3, 4\].*Lq=7.*got Lq=8"),
    (lambda: BlockDiagonal.from_seqlens([3, 5], [3, 6]), lambda m: fusedattn.attention(_BD_Q, _BD_Q, _BD_Q, mask=m),
     ValueError, r"mask is BlockDiagonal.*Lk=9.*Lk=8"),
    (lambda: BlockDiagonal.from_seqlens([3, 5]),
     lambda m: fusedattn.attention(*[np.zeros((2, 2, 8, 4), np.float32)] * 3, mask=m),
     ValueError, r"BlockDiagonal mask.*leading dims must be 1"),
    (lambda: BlockDiagonal.from_seqlens([3, 5]),
     lambda m: fusedattn.attention(*[np.zeros((2, 8, 4), np.float32)] * 3, mask=m),
     ValueError, r"BlockDiagonal mask.*leading dims must be 1"),
    (lambda: BlockDiagonal.from_seqlens([3, 4]),
     lambda m: fusedattn.attention_backward(_BD_Q[..., :4], _BD_Q, _BD_Q, _BD_Q, _BD_Q, _BD_Q[..., 0], mask=m),
     ValueError, r"mask is BlockDiagonal"),
    (lambda: BlockDiagonal.from_seqlens([3, 5]), lambda m: fusedattn.attention(_BD_Q, _BD_Q, _BD_Q, mask=m, q_start=2),
     ValueError, r"q_start / k_start do not combine with a BlockDiagonal mask"),
    (lambda: BlockDiagonal.from_seqlens([3, -1]), None, ValueError, r"q_seqlens must be >= 0"),
    (lambda: BlockDiagonal.from_seqlens([3, 5], [8]), None, ValueError,
     r"q_seqlens and kv_seqlens must list the same number of sequences"),
    (lambda: BlockDiagonal.from_seqlens([[3, 5]]), None, ValueError, r"q_seqlens must be a non-empty 1-D"),
    (lambda: BlockDiagonal.from_seqlens([3.5, 4.5]), None, TypeError, r"q_seqlens must hold integers"),
    (lambda: BlockDiagonal.from_seqlens([3, 5], ["a", "b"]), None, TypeError, r"kv_seqlens must hold integers"),
], ids=["total_q", "total_k", "batch_4d", "batch_3d", "backward_total", "q_start", "negative", "count_mismatch",
        "two_dim", "float_lengths", "str_lengths"])
def test_block_diagonal_errors(make, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        mask = make()
        if call is not None:
            call(mask)


def test_block_diagonal_properties():
    mask = BlockDiagonal.from_seqlens([2, 0, 3], [1, 2, 2])
    np.testing.assert_array_equal(mask.cu_seqlens_q, [0, 2, 2, 5])
    np.testing.assert_array_equal(mask.cu_seqlens_k, [0, 1, 3, 5])
    assert (mask.total_q, mask.total_k) == (5, 5)
    want = np.zeros((5, 5), bool)
    want[0:2, 0:1] = True  # sequence 0: 2 queries x 1 key; sequence 1 has no queries; sequence 2: 3 x 2
    want[2:5, 3:5] = True
    np.testing.assert_array_equal(mask.materialize(), want)
    assert repr(mask) == "BlockDiagonal(q_seqlens=[2, 0, 3], kv_seqlens=[1, 2, 2])"
    same = BlockDiagonal.from_seqlens(np.array([4, 1]))
    np.testing.assert_array_equal(same.kv_seqlens, [4, 1])
