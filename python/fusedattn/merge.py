"""Merging partial attention results: attention over disjoint key sets, combined by their logsumexp.

Attention over keys ``K = K_1 ∪ … ∪ K_n`` (disjoint) is a weighted mean of the attention over each part::

    lse   = log Σ_c exp(lse_c)
    out   = Σ_c exp(lse_c - lse) · out_c

because ``out_c`` is the softmax-weighted mean of ``v`` over ``K_c`` and ``exp(lse_c)`` is that part's
softmax denominator. This is the merge of flash-decoding and of sequence-parallel (ring) attention; the
kernel does the same internally when it splits the keys across threads, and :mod:`fusedattn.dask` does it
across Dask tasks.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from ._checks import compute_dtype, is_attention_dtype

__all__ = ["merge_attention"]


def merge_attention(outs: Sequence[np.ndarray], lses: Sequence[np.ndarray], *,
                    sinks=None) -> Tuple[np.ndarray, np.ndarray]:
    """Combine partial attention results computed over disjoint subsets of the keys.

    Each ``(outs[c], lses[c])`` is what ``fusedattn.attention(q, k_c, v_c, return_lse=True)`` returns for
    the same queries and one part ``k_c, v_c`` of the keys (pass ``q_start`` / ``k_start`` to that call
    so that causal, window and ALiBi patterns see global positions). The result equals one call over all
    keys, up to rounding.

    Args:
        outs: a non-empty sequence of partial outputs, all of one shape ``(..., Hq, Lq, Dv)`` and one
            dtype: float32, float64, float16 or bfloat16.
        lses: the matching logsumexps, each of shape ``(..., Hq, Lq)`` (``outs[c].shape[:-1]``), in the
            outputs' compute dtype as :func:`fusedattn.attention` returns them: the outputs' dtype, or
            float32 for 16-bit outputs.
        sinks: optional ``(Hq,)`` attention sinks (see :func:`fusedattn.attention`), counted once here: compute
            the parts *without* sinks and pass them to the merge, which adds each head's sink to every row's
            denominator (a part with lse ``sink`` and output 0). ``Hq`` is the lses' axis -2; a scalar (or
            ``(1,)``) sink applies to every row.

    Returns:
        ``(out, lse)`` of shapes ``(..., Hq, Lq, Dv)`` (the outputs' dtype) and ``(..., Hq, Lq)`` (the lses'
        dtype); new arrays, even for a single part.

    Semantics:
        * A part whose lse is ``-inf`` (it had no key the row may attend, or no keys at all) contributes
          nothing, whatever its output holds. A row that is ``-inf`` in every part gets output 0 and lse
          ``-inf``, like a fully-masked row of :func:`fusedattn.attention`.
        * Stable for any finite lse: the weights are ``exp(lse_c - max_c lse_c)``, never ``exp(lse_c)``.
        * The weights are computed in float64; the weighted sum, a convex combination, is accumulated in
          the compute dtype (float32 for 16-bit outputs, else the outputs' dtype) and rounded once to the
          outputs' dtype. For float32 the merge's error is measured no larger than the kernel's own (see
          tests/test_merge.py). For 16-bit, merging float32 partials (``out_dtype=np.float32`` in the
          partial calls) and rounding once at the end is more accurate than merging 16-bit partials.
        * NaN in any part's lse or (contributing) output makes that row NaN.

    Raises:
        ValueError: empty sequences, different numbers of outputs and lses, mismatched shapes.
        TypeError: an output dtype other than float32 / float64 / float16 / bfloat16, mixed output dtypes,
            or an lse dtype other than the outputs' compute dtype.

    Example:
        >>> import numpy as np, fusedattn as fa
        >>> rng = np.random.default_rng(0)
        >>> q = rng.standard_normal((1, 4, 8, 16), dtype=np.float32)
        >>> k, v = (rng.standard_normal((1, 4, 100, 16), dtype=np.float32) for _ in range(2))
        >>> # q holds the last 8 positions of a 100-token sequence: q_start=92 with causal=True (top-left,
        >>> # in global positions) is causal="bottom_right" of one call over all 100 keys.
        >>> parts = [fa.attention(q, k[..., s, :], v[..., s, :], causal=True, q_start=92, k_start=s.start,
        ...                       return_lse=True) for s in (slice(0, 40), slice(40, 100))]
        >>> out, lse = fa.merge_attention([o for o, _ in parts], [l for _, l in parts])
        >>> bool(np.allclose(out, fa.attention(q, k, v, causal="bottom_right"), atol=1e-5))
        True
    """
    outs, lses = _check(outs, lses)
    if sinks is not None:
        lses = lses + [_sink_part(sinks, lses[0])]  # a valueless part: _merge weighs only the outputs given
    out, lse = _merge(outs, np.stack(lses))
    return out, lse


def _sink_part(sinks, lse):
    """The sinks as one more part's lse, broadcast to ``lse``'s shape (heads on axis -2)."""
    s = np.asarray(sinks)
    if s.dtype == np.bool_ or not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise TypeError(f"sinks must be a real-valued array, got dtype {s.dtype}")
    if s.size == 1:
        column = s.reshape(())
    elif s.ndim == 1 and lse.ndim >= 2 and s.shape[0] == lse.shape[-2]:
        column = s[:, np.newaxis]
    else:
        raise ValueError(f"sinks must have shape (Hq,) = ({lse.shape[-2] if lse.ndim >= 2 else 1},) (the lses' axis -2) "
                         f"or be a scalar, got {s.shape}")
    return np.broadcast_to(column.astype(lse.dtype), lse.shape)


def _check(outs, lses):
    if isinstance(outs, np.ndarray) or isinstance(lses, np.ndarray):
        # An ndarray would be iterated along its first axis: almost certainly one partial passed alone.
        raise TypeError("outs and lses must be sequences of arrays (one per part of the keys), got an ndarray; "
                        "wrap a single part in a list: merge_attention([out], [lse])")
    try:
        outs, lses = list(outs), list(lses)
    except TypeError:
        raise TypeError(f"outs and lses must be sequences of arrays, got {type(outs).__name__} and "
                        f"{type(lses).__name__}") from None
    if not outs:
        raise ValueError("outs must hold at least one partial output, got an empty sequence")
    if len(outs) != len(lses):
        raise ValueError(f"outs and lses must have the same length (one lse per output), got {len(outs)} outputs "
                         f"and {len(lses)} lses")
    outs = [np.asarray(o) for o in outs]
    lses = [np.asarray(lse) for lse in lses]
    dtype = outs[0].dtype
    if not is_attention_dtype(dtype):
        raise TypeError(f"outs[0] must have dtype float32, float64, float16 or bfloat16, got {dtype}")
    lse_dtype = compute_dtype(dtype)
    if outs[0].ndim < 1:
        raise ValueError(f"outs[0] must have shape (..., Lq, Dv) (at least 1 dimension), got shape {outs[0].shape}")
    shape = outs[0].shape
    for c, (o, lse) in enumerate(zip(outs, lses)):
        if o.dtype != dtype:
            raise TypeError(f"outs[{c}] has dtype {o.dtype}, outs[0] has {dtype}: all parts must share one dtype")
        if lse.dtype != lse_dtype:
            raise TypeError(f"lses[{c}] has dtype {lse.dtype}; outputs of dtype {dtype} need lse in {lse_dtype} "
                            f"(as attention(..., return_lse=True) returns it)")
        if o.shape != shape:
            raise ValueError(f"outs[{c}] has shape {o.shape}, outs[0] has {shape}: all parts must be for the same "
                             f"queries, of shape (..., Hq, Lq, Dv)")
        if lse.shape != shape[:-1]:
            raise ValueError(f"lses[{c}] must have shape {shape[:-1]} (its output's shape without the last axis Dv), "
                             f"got {lse.shape}")
    return outs, lses


def _merge(outs, lse_stack):
    """The merge, for validated parts: ``outs`` a sequence of n arrays ``(..., Dv)``, ``lse_stack``
    ``(n, ...)`` in their compute dtype. Returns ``(out, lse)`` in the outputs' and the lses' dtypes."""
    dtype = outs[0].dtype
    coef, lse = merge_weights(lse_stack)
    # The weighted sum is a convex combination (coef >= 0, summing to 1 per row): accumulated in the compute
    # dtype its rounding error is at most ~(n + 2) eps * max|out_c|, the size of the kernel's own error
    # (measured in tests/test_merge.py), and 4-5x faster for float32 than widening every output to float64.
    # One part at a time into a reused buffer: stacking the parts for one einsum would copy them all first,
    # which costs as much as this loop (measured).
    dead = coef == 0  # parts with no key to attend for that row (lse -inf)
    out = np.empty(lse.shape + outs[0].shape[-1:], coef.dtype)
    term = np.empty_like(out) if len(outs) > 1 else out
    for c in range(len(outs)):
        target = out if c == 0 else term
        with np.errstate(invalid="ignore"):  # inf * 0 in a dead part: NaN, overwritten just below
            np.multiply(outs[c], coef[c][..., np.newaxis], out=target)
        if dead[c].any():
            # A part with weight 0 contributes nothing, even where its output holds NaN or inf (0 * NaN
            # would be NaN). Indexing by dead rows costs only as much as there are such rows.
            target[dead[c]] = 0.0
        if c:
            out += term
    return out.astype(dtype, copy=False), lse


def merge_weights(lse_stack):
    """``(coef, lse)`` from the parts' logsumexps ``(n, ...)``: ``out = sum_c coef[c] * out_c``.

    Computed in float64 and returned in ``lse_stack``'s dtype. ``coef`` is 0 for a part whose lse is -inf
    and on rows that are -inf in every part (whose lse stays -inf); NaN in any part makes the row NaN.
    Shared with the tree reduction of :mod:`fusedattn.dask`.
    """
    acc_dtype = lse_stack.dtype
    lse64 = lse_stack.astype(np.float64)
    top = lse64.max(axis=0)  # NaN in any part propagates here
    # Rows that are -inf (or +inf) in every part: shift by 0, so the weights below are exp(-inf) = 0 rather
    # than exp(-inf - -inf) = NaN.
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        weights = np.exp(lse64 - shift)  # (n, ...) in [0, 1]; the largest part has weight exactly 1
        total = weights.sum(axis=0)      # >= 1 on live rows, 0 on rows dead in every part
        lse = shift + np.log(total)      # log(0) = -inf on dead rows
        coef = weights / total           # 0 / 0 = NaN on dead rows: cleared next
    coef[:, total == 0] = 0.0
    return coef.astype(acc_dtype, copy=False), lse.astype(acc_dtype, copy=False)
