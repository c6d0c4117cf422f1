"""Packed variable-length batches (FlashAttention's ``*_varlen`` convention).

Sequences of different lengths are concatenated along the first axis: ``q`` is ``(total_q, Hq, D)`` and
sequence ``b`` owns rows ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]``. The kernel treats each sequence as a
batch entry of its own lengths, reading the packed arrays in place: no padding, no copy.
"""
from __future__ import annotations

from ._dispatch import dispatch
from ._spec import prepare_varlen, prepare_varlen_backward

__all__ = ["attention_varlen", "attention_varlen_backward"]


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                     scale=None, window=None, alibi_slopes=None, softcap=None, sinks=None, dropout_p=0.0, seed=None,
                     return_lse=False, out=None, precision="highest", num_threads=None):
    """Fused attention over a packed batch of variable-length sequences.

    Args:
        q: ``(total_q, Hq, D)``; sequence ``b`` is ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]``.
        k: ``(total_k, Hkv, D)``; v: ``(total_k, Hkv, Dv)``; ``Hq % Hkv == 0``.
        cu_seqlens_q, cu_seqlens_k: ``(batch + 1,)`` int32/int64 offsets: 0, then non-decreasing, ending at
            the packed length.
        max_seqlen_q, max_seqlen_k: optional; checked to be at least the longest sequence.
        causal, scale, window, alibi_slopes, softcap, sinks, dropout_p, seed: as in :func:`fusedattn.attention`,
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
    spec = prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                          causal=causal, scale=scale, window=window, alibi_slopes=alibi_slopes, softcap=softcap,
                          sinks=sinks, dropout_p=dropout_p, seed=seed, return_lse=return_lse, out=out, precision=precision,
                          num_threads=num_threads)
    return dispatch(spec).run(spec)


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                              max_seqlen_k=None, causal=False, scale=None, window=None, alibi_slopes=None,
                              softcap=None, sinks=None, dropout_p=0.0, seed=None, num_threads=None):
    """Gradients of :func:`attention_varlen`: ``(dq, dk, dv)`` shaped like the packed q, k, v.

    ``dout`` and ``out`` are ``(total_q, Hq, Dv)``, ``lse`` ``(Hq, total_q)`` from
    ``attention_varlen(..., return_lse=True)``; the other arguments exactly as passed to it (with dropout,
    the same ``seed``). Deterministic at any thread count. With ``sinks`` the result gains ``dsinks`` ``(Hq,)``.

    Example:
        >>> import numpy as np, fusedattn as fa
        >>> cu = np.array([0, 3, 8])
        >>> q = k = v = np.random.rand(8, 2, 16)
        >>> out, lse = fa.attention_varlen(q, k, v, cu, cu, return_lse=True)
        >>> [g.shape for g in fa.attention_varlen_backward(np.ones_like(out), q, k, v, out, lse, cu, cu)]
        [(8, 2, 16), (8, 2, 16), (8, 2, 16)]
    """
    spec = prepare_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                   max_seqlen_k=max_seqlen_k, causal=causal, scale=scale, window=window,
                                   alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, dropout_p=dropout_p,
                                   seed=seed, num_threads=num_threads)
    return dispatch(spec).run(spec)
