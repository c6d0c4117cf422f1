"""Packed variable-length batches (FlashAttention's ``*_varlen`` convention).

Sequences of different lengths are concatenated along the first axis: ``q`` is ``(total_q, Hq, D)`` and
sequence ``b`` owns rows ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]``. The kernel treats each sequence as a
batch entry of its own lengths, reading the packed arrays in place: no padding, no copy.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import _backend
from ._checks import (_as_float_array, _check_alignment, _overlaps, _positions, check_dropout, check_like,
                      check_num_threads, check_precision, compute_dtype, prepare)

__all__ = ["attention_varlen", "attention_varlen_backward"]


def check_cu_seqlens(cu_seqlens, name: str, total: int) -> np.ndarray:
    """``cu_seqlens``: 1-D int32/int64, starting at 0, non-decreasing, ending at ``total``."""
    if not isinstance(cu_seqlens, np.ndarray):
        cu_seqlens = np.asarray(cu_seqlens)
    if cu_seqlens.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise TypeError(f"{name} must have dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.size < 1:
        raise ValueError(f"{name} must be a 1-D array of batch + 1 offsets, got shape {cu_seqlens.shape}")
    if cu_seqlens[0] != 0:
        raise ValueError(f"{name} must start at 0, got {int(cu_seqlens[0])}")
    if (np.diff(cu_seqlens.astype(np.int64)) < 0).any():
        raise ValueError(f"{name} must be non-decreasing (monotone offsets), got {cu_seqlens.tolist()}")
    if cu_seqlens[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {int(cu_seqlens[-1])}")
    return np.ascontiguousarray(cu_seqlens, dtype=np.int64)


def _check_max_seqlen(max_seqlen, name: str, lengths: np.ndarray) -> None:
    if max_seqlen is None:
        return
    if isinstance(max_seqlen, (bool, np.bool_)) or not isinstance(max_seqlen, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(max_seqlen).__name__}")
    longest = int(lengths.max()) if lengths.size else 0
    if max_seqlen < longest:
        raise ValueError(f"{name}={max_seqlen} is smaller than the longest sequence ({longest})")


def prepare_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                   scale=None, window=None, alibi_slopes=None, softcap=None, dropout_p=0.0, seed=None,
                   need_seed=False):
    """Validate a packed call; returns (Prepared over (1, H, total, D) views, the kernel's `packed` tuple)."""
    q, k, v = (_as_float_array(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            raise ValueError(f"{name} must be packed as (total, heads, dim), got shape {x.shape}")
    cu_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
    cu_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0])
    if cu_q.size != cu_k.size:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_q.size - 1} and {cu_k.size - 1}")
    len_q, len_k = np.diff(cu_q), np.diff(cu_k)
    _check_max_seqlen(max_seqlen_q, "max_seqlen_q", len_q)
    _check_max_seqlen(max_seqlen_k, "max_seqlen_k", len_k)
    views = [x.swapaxes(0, 1)[np.newaxis] for x in (q, k, v)]  # (1, H, total, D), no copy
    p = prepare(*views, causal=causal, scale=scale, window=window, softcap=softcap)
    return _finish_packed(p, cu_q, cu_k, causal, alibi_slopes, dropout_p, seed, need_seed)


def _finish_packed(p, cu_q, cu_k, causal, alibi_slopes, dropout_p, seed, need_seed):
    """Per-sequence diagonals, ALiBi slopes per sequence and dropout for a packed Prepared."""
    batch, hq = cu_q.size - 1, p.q.shape[-3]
    if alibi_slopes is not None:
        slopes = np.asarray(alibi_slopes)
        if slopes.shape not in ((hq,), (batch, hq)):
            raise ValueError(f"alibi_slopes must have shape ({hq},) or ({batch}, {hq}) (sequences, Hq), got {slopes.shape}")
        p.positions["alibi_slopes"] = _positions(False, None, slopes, None, 0, 0, 0, 0, (batch,) if slopes.ndim == 2 else (),
                                                 hq, p.q.dtype)["alibi_slopes"]
    p.positions.update(check_dropout(dropout_p, seed, need_seed=need_seed))
    top_left = _check_alignment(causal)
    diagonal = np.zeros(batch, np.int64) if top_left else (np.diff(cu_k) - np.diff(cu_q)).astype(np.int64)
    return p, (cu_q, cu_k, diagonal)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                     scale=None, window=None, alibi_slopes=None, softcap=None, dropout_p=0.0, seed=None,
                     return_lse=False, out=None, precision="highest", num_threads=None):
    """Fused attention over a packed batch of variable-length sequences.

    Args:
        q: ``(total_q, Hq, D)``; sequence ``b`` is ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]``.
        k: ``(total_k, Hkv, D)``; v: ``(total_k, Hkv, Dv)``; ``Hq % Hkv == 0``.
        cu_seqlens_q, cu_seqlens_k: ``(batch + 1,)`` int32/int64 offsets: 0, then non-decreasing, ending at
            the packed length.
        max_seqlen_q, max_seqlen_k: optional; checked to be at least the longest sequence.
        causal, scale, window, alibi_slopes, softcap, dropout_p, seed: as in :func:`fusedattn.attention`,
            applied per sequence (bottom-right alignment uses each sequence's own lengths); ``alibi_slopes``
            is ``(Hq,)`` or ``(batch, Hq)``.
        return_lse: also return ``lse`` of shape ``(Hq, total_q)`` (FlashAttention's layout).
        out: optional ``(total_q, Hq, Dv)`` array to write into.
        precision: ``"highest"`` (default), ``"high"`` or ``"medium"``: float32 products on the AMX tiles as
            in :func:`fusedattn.attention` (packed calls always take the tiles' prefill layout there); ignored
            on other ISA levels, other dtypes and the NumPy fallback.

    Returns:
        ``out`` ``(total_q, Hq, Dv)`` in the inputs' dtype, or ``(out, lse)``.

    Example:
        >>> import numpy as np, fusedattn as fa
        >>> cu = np.array([0, 3, 8])                      # two sequences: 3 and 5 tokens
        >>> q = k = v = np.random.rand(8, 2, 16).astype(np.float32)
        >>> fa.attention_varlen(q, k, v, cu, cu, causal=True).shape
        (8, 2, 16)
    """
    threads = check_num_threads(num_threads)
    fp32_precision = check_precision(precision)
    if _backend._core is None:
        from . import reference
        return reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale, window=window,
                                          alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, seed=seed,
                                          return_lse=return_lse, out=out)
    p, packed = prepare_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                               max_seqlen_k=max_seqlen_k, causal=causal, scale=scale, window=window,
                               alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, seed=seed)
    p.positions.update(fp32_precision)
    out_shape = (p.q.shape[-2], p.q.shape[-3], p.v.shape[-1])
    if out is None:
        out = np.empty(out_shape, p.q.dtype)
    else:
        if not isinstance(out, np.ndarray) or out.shape != out_shape or out.dtype != p.q.dtype or not out.flags.writeable:
            raise ValueError(f"out must be a writeable {p.q.dtype} array of shape {out_shape}")
        for name, arr in (("q", p.q), ("k", p.k), ("v", p.v)):
            if _overlaps(out, arr):
                raise ValueError(f"out must not overlap {name}: the kernel reads {name} while writing out")
    lse = np.empty((p.q.shape[-3], p.q.shape[-2]), compute_dtype(p.q.dtype)) if return_lse else None
    run_packed_forward(p, packed, out.swapaxes(0, 1)[np.newaxis], None if lse is None else lse[np.newaxis], threads)
    return (out, lse) if return_lse else out


def run_packed_forward(p, packed, out_view, lse_view, threads, score_weight=None):
    """The kernel call for a packed Prepared: out (1, Hq, total_q, Dv) and lse (1, Hq, total_q) views."""
    _backend._core.attention_forward(p.q, p.k, p.v, None, p.positions, p.scale, out_view, lse_view,
                                     threads or _backend.default_num_threads(), score_weight, packed)


def run_packed_backward(p, packed, dout_view, out_view, lse_view, grads, threads):
    """The backward kernel call for a packed Prepared; ``grads`` are (1, H, total, D) views to fill."""
    _backend._core.attention_backward(dout_view, p.q, p.k, p.v, out_view, lse_view, None, p.positions, p.scale,
                                      *grads, threads or _backend.default_num_threads(), None, None, packed)


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                              max_seqlen_k=None, causal=False, scale=None, window=None, alibi_slopes=None,
                              softcap=None, dropout_p=0.0, seed=None, num_threads=None):
    """Gradients of :func:`attention_varlen`: ``(dq, dk, dv)`` shaped like the packed q, k, v.

    ``dout`` and ``out`` are ``(total_q, Hq, Dv)``, ``lse`` ``(Hq, total_q)`` from
    ``attention_varlen(..., return_lse=True)``; the other arguments exactly as passed to it (with dropout,
    the same ``seed``). Deterministic at any thread count.

    Example:
        >>> import numpy as np, fusedattn as fa
        >>> cu = np.array([0, 3, 8])
        >>> q = k = v = np.random.rand(8, 2, 16)
        >>> out, lse = fa.attention_varlen(q, k, v, cu, cu, return_lse=True)
        >>> [g.shape for g in fa.attention_varlen_backward(np.ones_like(out), q, k, v, out, lse, cu, cu)]
        [(8, 2, 16), (8, 2, 16), (8, 2, 16)]
    """
    threads = check_num_threads(num_threads)
    if _backend._core is None:
        from . import reference
        return reference.attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                                   scale=scale, window=window, alibi_slopes=alibi_slopes,
                                                   softcap=softcap, dropout_p=dropout_p, seed=seed)
    p, packed = prepare_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                               max_seqlen_k=max_seqlen_k, causal=causal, scale=scale, window=window,
                               alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, seed=seed,
                               need_seed=True)
    dtype = p.q.dtype
    packed_out = (p.q.shape[-2], p.q.shape[-3], p.v.shape[-1])
    dout = check_like(dout, "dout", packed_out, dtype)
    out = check_like(out, "out", packed_out, dtype)
    lse = check_like(lse, "lse", (p.q.shape[-3], p.q.shape[-2]), compute_dtype(dtype))
    grads = tuple(np.zeros(np.shape(x), dtype) for x in (q, k, v))
    run_packed_backward(p, packed, dout.swapaxes(0, 1)[np.newaxis], out.swapaxes(0, 1)[np.newaxis], lse[np.newaxis],
                        tuple(g.swapaxes(0, 1)[np.newaxis] for g in grads), threads)
    return grads
