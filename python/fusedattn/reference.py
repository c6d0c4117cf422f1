"""Pure-NumPy float64 reference: the oracle of every test, and the fallback without the extension.

Same signatures and semantics as :mod:`fusedattn`; the scores are materialised (in query chunks, to
bound memory), computed in float64 and cast back to the input dtype.
"""
from __future__ import annotations

import numpy as np

from .masks import BlockDiagonal
from ._checks import (check_dropout, check_kind, check_like, check_num_threads, check_out, check_out_dtype,
                      check_score_weight, compute_dtype, dropout_keep_factor, prepare)

__all__ = [
    "attention", "additive_attention", "attention_weights", "attention_backward", "additive_attention_backward",
    "attention_varlen", "attention_varlen_backward",
]

_CHUNK_BYTES = 64 << 20  # bound the float64 score chunk so the fallback never needs O(Lq*Lk) per head at once


def attention(q, k, v, *, mask=None, causal=False, scale=None, window=None, alibi_slopes=None, softcap=None, q_start=0,
              k_start=0, dropout_p=0.0, seed=None, return_lse=False, out=None, out_dtype=None, num_threads=None):
    """Softmax attention ``softmax(q @ k^T * scale + mask) @ v`` in float64 NumPy.

    Takes exactly the arguments of :func:`fusedattn.attention` (``num_threads`` is accepted and
    ignored) and returns the same result: ``out`` of shape ``(..., Hq, Lq, Dv)`` in the input dtype,
    and with ``return_lse=True`` also ``lse`` of shape ``(..., Hq, Lq)``. Rows with no key they may
    attend give 0 and lse ``-inf``.

    The scores, softmax and weighted sum are computed in float64 whatever the input dtype, but the result
    is returned in the input dtype (or ``out_dtype``): float32 inputs give float32 ``out`` and ``lse``,
    rounded once from the float64 values. Pass float64 arrays to get the float64 result itself.

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> q = k = v = np.ones((2, 4, 8), np.float32)
        >>> reference.attention(q, k, v).shape
        (2, 4, 8)
    """
    check_num_threads(num_threads)
    if isinstance(mask, BlockDiagonal):
        packed_args = _block_diagonal_as_packed(q, k, v, mask)
        result = attention_varlen(*packed_args[0], mask.cu_seqlens_q, mask.cu_seqlens_k, causal=causal, scale=scale,
                                  window=window, alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p,
                                  seed=seed, return_lse=True)
        out_full, lse_full = (packed_args[1](x) for x in result)
        if out is not None:
            out[...] = out_full
            out_full = out
        return (out_full, lse_full) if return_lse else out_full
    p = prepare(q, k, v, mask=mask, causal=causal, scale=scale, window=window, alibi_slopes=alibi_slopes, softcap=softcap, q_start=q_start, k_start=k_start)
    p.positions.update(check_dropout(dropout_p, seed))
    if out is not None:
        check_out(out, p, (("q", p.q), ("k", p.k), ("v", p.v), ("mask", p.mask)), check_out_dtype(out_dtype, p.q.dtype))
    return _finish(p, _softmax_f64(p, _dot_scores(p)), return_lse, out, out_dtype)


def additive_attention(q, k, v, *, score_weight=None, mask=None, causal=False, window=None, alibi_slopes=None,
                       softcap=None, q_start=0, k_start=0, dropout_p=0.0, seed=None, return_lse=False, out=None,
                       out_dtype=None, num_threads=None):
    """Additive (Bahdanau / Keras) attention in float64 NumPy: ``score[i, j] = sum_d w_d tanh(q[i, d] + k[j, d])``.

    The arguments and result of :func:`fusedattn.additive_attention`.

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> q = k = v = np.ones((5, 8))
        >>> reference.additive_attention(q, k, v, score_weight=np.full(8, 0.5)).shape
        (5, 8)
    """
    check_num_threads(num_threads)
    p = prepare(q, k, v, mask=mask, causal=causal, scale=1.0, window=window, alibi_slopes=alibi_slopes, softcap=softcap, q_start=q_start, k_start=k_start)
    p.positions.update(check_dropout(dropout_p, seed))
    weight = check_score_weight(score_weight, p.q.shape[-1], np.float64)
    if out is not None:
        check_out(out, p, (("q", p.q), ("k", p.k), ("v", p.v), ("mask", p.mask)))
    return _finish(p, _softmax_f64(p, _additive_scores(p, weight)), return_lse, out, out_dtype)


def attention_weights(q, k, *, mask=None, causal=False, scale=None, kind="dot", score_weight=None, window=None, alibi_slopes=None, softcap=None, q_start=0, k_start=0,
                      num_threads=None):
    """The attention probabilities ``(..., Hq, Lq, Lk)`` in float64 NumPy, cast to the input dtype.

    The arguments and result of :func:`fusedattn.attention_weights`.

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> w = reference.attention_weights(np.ones((3, 4)), np.ones((5, 4)))
        >>> w.shape, round(float(w.sum()), 6)
        ((3, 5), 3.0)
    """
    check_num_threads(num_threads)
    kind = check_kind(kind)
    p = prepare(q, k, k, mask=mask, causal=causal, scale=scale, window=window, alibi_slopes=alibi_slopes, softcap=softcap, q_start=q_start, k_start=k_start)
    if kind == "additive":  # scale is validated above but additive scores are not scaled
        p.scale = 1.0
    if kind == "additive":
        scores = _additive_scores(p, check_score_weight(score_weight, p.q.shape[-1], np.float64))
    else:
        if score_weight is not None:
            raise ValueError("score_weight applies to kind='additive' only")
        scores = _dot_scores(p)
    weights = _softmax_f64(p, scores, values=False)
    return weights.reshape(p.lse_shape + (p.k.shape[-2],)).astype(p.q.dtype)


def attention_backward(dout, q, k, v, out, lse, *, mask=None, causal=False, scale=None, window=None, alibi_slopes=None,
                       softcap=None, q_start=0, k_start=0, dropout_p=0.0, seed=None, num_threads=None):
    """Gradients of :func:`attention` in float64 NumPy, from recomputed probabilities.

    The arguments and results of :func:`fusedattn.attention_backward`. ``out`` and ``lse`` are checked
    but not used: the reference recomputes everything from q, k, v, so it is an independent oracle.

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> q = k = v = np.ones((3, 2))
        >>> out, lse = reference.attention(q, k, v, return_lse=True)
        >>> [g.shape for g in reference.attention_backward(np.ones((3, 2)), q, k, v, out, lse)]
        [(3, 2), (3, 2), (3, 2)]
    """
    check_num_threads(num_threads)
    p = prepare(q, k, v, mask=mask, causal=causal, scale=scale, window=window, alibi_slopes=alibi_slopes, softcap=softcap, q_start=q_start, k_start=k_start)
    p.positions.update(check_dropout(dropout_p, seed, need_seed=True))
    return _backward_f64(p, dout, out, lse, (q, k, v), None)


def additive_attention_backward(dout, q, k, v, out, lse, *, score_weight=None, mask=None, causal=False,
                                window=None, alibi_slopes=None, softcap=None, q_start=0, k_start=0, dropout_p=0.0,
                                seed=None, num_threads=None):
    """Gradients of :func:`additive_attention` in float64 NumPy: ``(dq, dk, dv, dscore_weight)``.

    The arguments and results of :func:`fusedattn.additive_attention_backward`; like
    :func:`attention_backward` it recomputes everything from the inputs.

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> q = k = v = np.ones((3, 2))
        >>> out, lse = reference.additive_attention(q, k, v, return_lse=True)
        >>> [g.shape for g in reference.additive_attention_backward(np.ones((3, 2)), q, k, v, out, lse)]
        [(3, 2), (3, 2), (3, 2), (2,)]
    """
    check_num_threads(num_threads)
    p = prepare(q, k, v, mask=mask, causal=causal, scale=1.0, window=window, alibi_slopes=alibi_slopes, softcap=softcap, q_start=q_start, k_start=k_start)
    p.positions.update(check_dropout(dropout_p, seed, need_seed=True))
    weight = check_score_weight(score_weight, p.q.shape[-1], np.float64)
    return _backward_f64(p, dout, out, lse, (q, k, v), weight)


def _backward_f64(p, dout, out, lse, user_inputs, weight):
    """dq, dk, dv (and dw for additive scores, weight given) from recomputed float64 probabilities."""
    dtype = p.q.dtype
    dout = check_like(dout, "dout", p.out_shape, dtype)
    check_like(out, "out", p.out_shape, dtype)
    check_like(lse, "lse", p.lse_shape, compute_dtype(dtype))
    hq, hkv = p.q.shape[-3], p.k.shape[-3]
    group = hq // hkv
    scores = _dot_scores(p) if weight is None else _additive_scores(p, weight)
    weights = _softmax_f64(p, scores, values=False)  # (..., Hq, Lq, Lk)
    d_out = dout.astype(np.float64).reshape(p.q.shape[:-1] + (p.v.shape[-1],))
    q64, k64, v64 = p.q.astype(np.float64), _kv_heads(p.k, group), _kv_heads(p.v, group)
    keep = _dropout_factor(p, 0, p.q.shape[-2])  # 1 without dropout
    d_v = np.swapaxes(weights * keep, -1, -2) @ d_out
    d_p = (d_out @ np.swapaxes(v64, -1, -2)) * keep
    d_s = weights * (d_p - (weights * d_p).sum(axis=-1, keepdims=True))
    cap = p.positions.get("softcap")
    if cap:  # through s -> cap * tanh(s / cap): times 1 - tanh^2
        d_s = d_s * (1.0 - np.tanh(scores(0, p.q.shape[-2]) / cap) ** 2)
    if weight is None:
        d_q = p.scale * (d_s @ k64)
        d_k = p.scale * (np.swapaxes(d_s, -1, -2) @ q64)
    else:
        t = np.tanh(q64[..., :, None, :] + k64[..., None, :, :])  # (..., Lq, Lk, D): small test shapes only
        g = d_s[..., None] * (1.0 - t * t) * weight
        d_q, d_k = g.sum(axis=-2), g.sum(axis=-3)
        d_w = (d_s[..., None] * t).sum(axis=tuple(range(t.ndim - 1)))

    def per_kv_head(grad):  # sum the query heads of each group onto their kv head
        return grad.reshape(grad.shape[:-3] + (hkv, group) + grad.shape[-2:]).sum(axis=-3)

    grads = tuple(g.reshape(np.shape(x)).astype(dtype)
                  for g, x in zip((d_q, per_kv_head(d_k), per_kv_head(d_v)), user_inputs))
    return grads if weight is None else grads + (d_w.astype(compute_dtype(dtype)),)


def _block_diagonal_as_packed(q, k, v, mask):
    """Dense (..., H, total, D) arrays with a BlockDiagonal mask -> packed (total, H, D) arrays, and the
    function mapping packed results (out (total, H, Dv) or lse (H, total)) back to the dense shapes."""
    p = prepare(q, k, v)
    packed = [x.reshape(x.shape[-3:]).swapaxes(0, 1) for x in (p.q, p.k, p.v)]

    def unpack(x):
        dense = x.swapaxes(0, 1) if x.ndim == 3 else x  # out (H, total, Dv); lse already (H, total)
        return dense.reshape(p.out_shape if x.ndim == 3 else p.lse_shape)

    return packed, unpack


def _packed_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window, alibi_slopes, softcap, dropout_p,
                      seed, need_seed=False):
    """Yield (b, Prepared, q rows, k rows) for each sequence of a packed batch, positions as the kernel sees them."""
    from .varlen import prepare_packed

    _, (cu_q, cu_k, _) = prepare_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
                                        window=window, alibi_slopes=alibi_slopes, softcap=softcap,
                                        dropout_p=dropout_p, seed=seed, need_seed=need_seed)
    dropout = check_dropout(dropout_p, seed, need_seed=need_seed)
    slopes = None if alibi_slopes is None else np.asarray(alibi_slopes)
    for b in range(cu_q.size - 1):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        views = [x[rows].swapaxes(0, 1)[np.newaxis] for x, rows in ((q, rows_q), (k, rows_k), (v, rows_k))]
        p = prepare(*views, causal=causal, scale=scale, window=window, softcap=softcap,
                    alibi_slopes=None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b]))
        p.positions.update(dropout, dropout_batch=b)
        yield b, p, rows_q, rows_k


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                     scale=None, window=None, alibi_slopes=None, softcap=None, dropout_p=0.0, seed=None,
                     return_lse=False, out=None, num_threads=None):
    """:func:`fusedattn.attention_varlen` in float64 NumPy, one sequence at a time.

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> cu = np.array([0, 2, 5])
        >>> reference.attention_varlen(np.ones((5, 1, 4)), np.ones((5, 1, 4)), np.ones((5, 1, 4)), cu, cu).shape
        (5, 1, 4)
    """
    check_num_threads(num_threads)
    q, k, v = (np.asarray(x) for x in (q, k, v))
    result = np.zeros(q.shape[:2] + v.shape[-1:], q.dtype)
    lse = np.full(q.shape[1::-1], -np.inf, compute_dtype(q.dtype))
    for _, p, rows_q, _ in _packed_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window,
                                             alibi_slopes, softcap, dropout_p, seed):
        out64, lse64 = _softmax_f64(p, _dot_scores(p))
        result[rows_q] = out64[0].swapaxes(0, 1)
        lse[:, rows_q] = lse64[0]
    if out is not None:
        out[...] = result
        result = out
    return (result, lse) if return_lse else result


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                              max_seqlen_k=None, causal=False, scale=None, window=None, alibi_slopes=None,
                              softcap=None, dropout_p=0.0, seed=None, num_threads=None):
    """:func:`fusedattn.attention_varlen_backward` in float64 NumPy, one sequence at a time.

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> cu, x = np.array([0, 2, 5]), np.ones((5, 1, 4))
        >>> out, lse = reference.attention_varlen(x, x, x, cu, cu, return_lse=True)
        >>> [g.shape for g in reference.attention_varlen_backward(np.ones_like(out), x, x, x, out, lse, cu, cu)]
        [(5, 1, 4), (5, 1, 4), (5, 1, 4)]
    """
    check_num_threads(num_threads)
    q, k, v, dout, out, lse = (np.asarray(x) for x in (q, k, v, dout, out, lse))
    grads = [np.zeros(x.shape, q.dtype) for x in (q, k, v)]
    for _, p, rows_q, rows_k in _packed_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window,
                                                  alibi_slopes, softcap, dropout_p, seed, need_seed=True):
        seq_views = [x[rows_q].swapaxes(0, 1)[np.newaxis] for x in (dout, out)]
        d_q, d_k, d_v = _backward_f64(p, seq_views[0], seq_views[1], lse[:, rows_q][np.newaxis],
                                      (p.q, p.k, p.v), None)
        grads[0][rows_q] = d_q[0].swapaxes(0, 1)
        grads[1][rows_k] = d_k[0].swapaxes(0, 1)
        grads[2][rows_k] = d_v[0].swapaxes(0, 1)
    return tuple(grads)


def _dropout_factor(p, start, stop):
    """The kernel's dropout factors for query rows [start, stop): (..., Hq, rows, Lk), or 1 without dropout."""
    if "dropout_p" not in p.positions:
        return 1.0
    lead, hq, lk = p.q.shape[:-3], p.q.shape[-3], p.k.shape[-2]
    first = p.positions.get("dropout_batch", 0) * hq  # packed sequences: the kernel's batch index is the sequence
    batch_head = (first + np.arange(int(np.prod(lead)) * hq)).reshape(lead + (hq, 1, 1))
    return dropout_keep_factor(p.positions, batch_head, np.arange(start, stop)[:, None], np.arange(lk)[None, :])


def _finish(p, out_and_lse, return_lse, out, out_dtype=None):
    out64, lse64 = out_and_lse
    result = out64.reshape(p.out_shape).astype(check_out_dtype(out_dtype, p.q.dtype) if out is None else out.dtype)
    if out is not None:
        out[...] = result
        result = out
    if return_lse:
        return result, lse64.reshape(p.lse_shape).astype(compute_dtype(p.q.dtype))
    return result


def _kv_heads(x, group):
    # Query head h reads kv head h // group: repeat kv heads (a copy, which the kernel never makes).
    return np.repeat(x.astype(np.float64), group, axis=-3)


def _dot_scores(p):
    """scores(rows) -> the scaled q.k^T scores of query rows [start, stop), float64."""
    q = p.q.astype(np.float64)
    k_t = np.swapaxes(_kv_heads(p.k, p.q.shape[-3] // p.k.shape[-3]), -1, -2)
    return lambda start, stop: (q[..., start:stop, :] @ k_t) * p.scale


def _additive_scores(p, weight):
    """scores(rows) -> sum_d w_d tanh(q[i, d] + k[j, d]) of query rows [start, stop), float64."""
    q = p.q.astype(np.float64)
    k = _kv_heads(p.k, p.q.shape[-3] // p.k.shape[-3])
    return lambda start, stop: np.tanh(q[..., start:stop, None, :] + k[..., None, :, :]) @ weight


def _softmax_f64(p, scores_of, values=True):
    """Masked softmax of the scores, chunked over query rows: (out, lse), or the weights when not ``values``."""
    lead = p.q.shape[:-3]
    hq, lq, d = p.q.shape[-3:]
    hkv, lk, dv = p.v.shape[-3:]
    v = _kv_heads(p.v, hq // hkv) if values else None
    out = np.zeros(lead + (hq, lq, dv)) if values else np.zeros(lead + (hq, lq, lk))
    lse = np.full(lead + (hq, lq), -np.inf)
    if lk == 0:
        return (out, lse) if values else out  # no key at all: every row attends nothing
    per_row = 8 * lk * hq * max(1, int(np.prod(lead))) * d  # the additive scores' (rows, Lk, D) temporary
    rows_per_chunk = max(1, _CHUNK_BYTES // max(1, per_row))  # per_row is 0 when there are no heads
    key_index = np.arange(lk)
    for start in range(0, lq, rows_per_chunk):
        stop = min(lq, start + rows_per_chunk)
        scores = scores_of(start, stop)
        if "softcap" in p.positions:
            scores = p.positions["softcap"] * np.tanh(scores / p.positions["softcap"])
        diagonal = np.arange(start, stop)[:, None] + p.positions["diagonal_offset"]  # (rows, 1)
        if "alibi_slopes" in p.positions:
            slopes = p.positions["alibi_slopes"].astype(np.float64)  # (1 or batch, Hq)
            slopes = slopes.reshape((hq, 1, 1) if slopes.shape[0] == 1 else lead + (hq, 1, 1))
            scores = scores - slopes * np.abs(diagonal - key_index[None, :])
        if p.mask is not None:
            chunk_mask = p.mask[..., start:stop, :]
            if chunk_mask.dtype == np.bool_:
                scores = np.where(chunk_mask, scores, -np.inf)
            else:
                scores = scores + chunk_mask.astype(np.float64)
        if "window" in p.positions:
            left, right = p.positions["window"]
            allowed = (key_index[None, :] >= diagonal - left) & (key_index[None, :] <= diagonal + right)
            scores = np.where(allowed, scores, -np.inf)
        row_max = scores.max(axis=-1, keepdims=True)
        # A row whose every score is -inf attends nothing: subtract 0 there so its weights are exp(-inf) = 0
        # rather than NaN, and divide by 1 so it outputs 0. NaN scores still propagate, as they should.
        attends_nothing = np.isneginf(row_max)
        safe_max = np.where(attends_nothing, 0.0, row_max)
        weights = np.exp(scores - safe_max)
        denom = np.where(attends_nothing, 1.0, weights.sum(axis=-1, keepdims=True))
        if values:
            out[..., start:stop, :] = (weights / denom * _dropout_factor(p, start, stop)) @ v
            lse[..., start:stop] = np.where(attends_nothing, -np.inf, safe_max + np.log(denom))[..., 0]
        else:
            out[..., start:stop, :] = weights / denom
    return (out, lse) if values else out


