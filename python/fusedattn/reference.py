"""Pure-NumPy float64 reference: the oracle of every test, and the fallback without the extension.

The functions take the arguments of their :mod:`fusedattn` namesakes as plain arrays and numbers and
compute the same result by definition: the scores are materialised (in query chunks, to bound memory),
everything is computed in float64, and the result is cast once to the input dtype (or ``out_dtype``).

This module imports nothing of the package (only NumPy and the standard library), so it cannot share a
mistake with the API it checks. It does not validate either: the public functions do that before they
compute or fall back here, so the reference assumes valid inputs and only normalises what it needs to
compute (the implicit head axis of 2-D / 3-D inputs, the causal alignments, ``window`` sides of None or
-1, ALiBi slopes per head or per batch entry, mask broadcasting, 16-bit inputs via float64).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "attention", "additive_attention", "attention_weights", "attention_backward", "additive_attention_backward",
    "attention_varlen", "attention_varlen_backward", "attention_paged", "dropout_keep_factor", "is_half_dtype",
    "compute_dtype",
]

_CHUNK_BYTES = 64 << 20  # bound the float64 score chunk so the fallback never needs O(Lq*Lk) per head at once


# ---------------------------------------------------------------------------------------------------------
# dtypes and the dropout hash
# ---------------------------------------------------------------------------------------------------------

def is_half_dtype(dtype) -> bool:
    """16-bit storage: float16, or bfloat16 (ml_dtypes, the NumPy ecosystem's bfloat16). The kernels compute
    in float32 (lse, float masks, ALiBi slopes, sinks too) and store 16-bit. bfloat16 is recognised by its
    name, as the C++ bindings do, so checking a dtype never imports ml_dtypes (~0.2-2 s): only users who
    hold bfloat16 arrays have loaded it. The API imports this rule from here.

    Example:
        >>> import numpy as np
        >>> is_half_dtype(np.float16), is_half_dtype(np.float32)
        (True, False)
    """
    dtype = np.dtype(dtype)
    # The size first: dtype.name builds a string (~1.6 us), and this runs in every decode step's checks.
    return dtype == np.float16 or (dtype.itemsize == 2 and dtype.name == "bfloat16")


def compute_dtype(dtype) -> np.dtype:
    """The dtype the kernels accumulate in for inputs of ``dtype`` (float32 for 16-bit floats): lse,
    dsinks and dscore_weight come in it, and float masks, slopes and sinks are rounded to it.

    Example:
        >>> import numpy as np
        >>> compute_dtype(np.float16), compute_dtype(np.float64)
        (dtype('float32'), dtype('float64'))
    """
    return np.dtype(np.float32) if is_half_dtype(dtype) else np.dtype(dtype)


def _rounded(x, dtype) -> np.ndarray:
    """x as the kernels hold it (rounded to ``dtype``'s compute dtype), then widened to float64."""
    return np.asarray(x).astype(compute_dtype(dtype)).astype(np.float64)


def dropout_keep_factor(positions: dict, batch_head, query, key, dtype=np.float64):
    """The kernels' dropout factor (0 or ``1 / (1 - p)``) for broadcastable integer position arrays.

    ``positions`` holds ``seed`` (int in [0, 2**64)), ``dropout_p``, ``q_start`` and ``k_start``; element
    (batch * Hq + head, q_start + query, k_start + key) is kept iff its hash is at least ``p * 2**32``.
    The hash is ``dropout_hash`` of cpp/src/kernels/masks.h bit for bit: murmur3's finaliser over the
    seed's low word and the (batch_head, query) pair, then again with the seed's high word and the key,
    all in uint32 arithmetic. This is its one Python copy; the API imports it from here.

    Example:
        >>> import numpy as np
        >>> pos = {"seed": 7, "dropout_p": 0.5, "q_start": 0, "k_start": 0}
        >>> z = dropout_keep_factor(pos, np.arange(2)[:, None, None], np.arange(64)[:, None], np.arange(64))
        >>> z.shape, sorted(set(z.ravel().tolist()))
        ((2, 64, 64), [0.0, 2.0])
    """
    def mix(x):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x85EBCA6B)
        x = x ^ (x >> np.uint32(13))
        x = x * np.uint32(0xC2B2AE35)
        return x ^ (x >> np.uint32(16))

    seed = int(positions["seed"])
    u32 = lambda a: np.asarray(a).astype(np.uint64).astype(np.uint32)  # noqa: E731 - wrap modulo 2^32
    with np.errstate(over="ignore"):
        h = mix(np.uint32(seed & 0xFFFFFFFF) ^ (u32(batch_head) * np.uint32(0xC2B2AE3D))
                ^ (u32(positions["q_start"] + np.asarray(query)) * np.uint32(0x9E3779B1)))
        h = mix(h ^ np.uint32(seed >> 32) ^ (u32(positions["k_start"] + np.asarray(key)) * np.uint32(0x85EBCA77)))
    threshold = np.uint32(int(positions["dropout_p"] * 4294967296.0))
    return np.where(h >= threshold, 1.0 / (1.0 - positions["dropout_p"]), 0.0).astype(dtype)


# ---------------------------------------------------------------------------------------------------------
# One call, normalised to float64 (*lead, H, L, D) arrays
# ---------------------------------------------------------------------------------------------------------

def _head_view(x, rank):
    """(L, D) and (B, L, D) inputs have an implicit head axis: insert it (a view)."""
    if rank == 2:
        return x[np.newaxis]
    if rank == 3:
        return np.expand_dims(x, 1)
    return x


def _dequantised(x, scale):
    """int8 storage times its per-(..., head, token) scale; other arrays as they are, widened to float64."""
    x64 = np.asarray(x).astype(np.float64)
    return x64 if scale is None else x64 * np.asarray(scale).astype(np.float64)[..., None]


class _Call:
    """One attention call in the kernels' position model, every array float64 in ``(*lead, H, L, D)``.

    Row i's diagonal is key ``i + offset``: ``offset = q_start - k_start`` for top-left alignment
    (causal=True / "top_left"), plus ``Lk - Lq`` for bottom-right (causal="bottom_right", and window /
    ALiBi without causal, as FlashAttention does). Causal keeps keys up to the diagonal; ``window``
    keeps ``[diagonal - left, diagonal + right]``.
    """

    def __init__(self, q, k, v, *, mask=None, causal=False, scale=None, window=None, alibi_slopes=None,
                 softcap=None, q_start=0, k_start=0, sinks=None, dropout_p=0.0, seed=None, first_batch=0,
                 k_scale=None, v_scale=None):
        q = np.asarray(q)
        self.dtype = q.dtype
        self.rank = rank = q.ndim
        self.q = _head_view(q.astype(np.float64), rank)
        self.k = _head_view(_dequantised(k, k_scale), rank)
        self.v = _head_view(_dequantised(v, v_scale), rank)
        self.out_shape = q.shape[:-1] + self.v.shape[-1:]
        self.lse_shape = q.shape[:-1]
        self.lead = self.q.shape[:-3]
        hq, lq, d = self.q.shape[-3:]
        hkv, lk = self.k.shape[-3:-1]
        self.group = hq // hkv if hkv else 1

        if isinstance(causal, str):
            if causal not in ("top_left", "bottom_right"):  # no meaning to compute; the API words the error
                raise ValueError(f"causal must be one of False, True, 'top_left', 'bottom_right'; got {causal!r}")
            is_causal, top_left = True, causal == "top_left"
        else:
            is_causal = top_left = bool(causal)
        self.offset = int(q_start) - int(k_start) + (0 if top_left else lk - lq)
        self.window = None
        if window is not None or is_causal:
            left, right = (None, None) if window is None else window
            unbounded = lambda side: side is None or side == -1  # noqa: E731
            self.window = (math.inf if unbounded(left) else int(left),
                           0 if is_causal else (math.inf if unbounded(right) else int(right)))

        self.slopes = None
        if alibi_slopes is not None:
            slopes = _rounded(alibi_slopes, self.dtype)
            # (Hq,) is shared by the batch; (*lead, Hq) holds one row per batch entry.
            self.slopes = slopes.reshape((hq, 1, 1) if slopes.shape == (hq,) else self.lead + (hq, 1, 1))
        self.softcap = float(softcap) if softcap else None
        self.scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        self.sinks = None if sinks is None else _rounded(sinks, self.dtype).reshape(hq, 1, 1)

        self.mask = None
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype != np.bool_:
                mask = _rounded(mask, self.dtype)  # before broadcasting, so the broadcast stays a view
            self.mask = _head_view(np.broadcast_to(mask, q.shape[:-1] + (lk,)), rank)

        self.dropout = None
        if dropout_p:
            batch = int(np.prod(self.lead))
            batch_head = (first_batch * hq + np.arange(batch * hq)).reshape(self.lead + (hq, 1, 1))
            self.dropout = ({"seed": int(seed), "dropout_p": float(dropout_p), "q_start": int(q_start),
                             "k_start": int(k_start)}, batch_head)

    def kv_heads(self, x):
        # Query head h reads kv head h // group: repeat kv heads (a copy, which the kernels never make).
        return np.repeat(x, self.group, axis=-3)

    def keep(self, start, stop):
        """The dropout factors of query rows [start, stop): (*lead, Hq, rows, Lk), or 1 without dropout."""
        if self.dropout is None:
            return 1.0
        positions, batch_head = self.dropout
        return dropout_keep_factor(positions, batch_head, np.arange(start, stop)[:, None],
                                   np.arange(self.k.shape[-2])[None, :])

    def dot_scores(self):
        """scores(start, stop) -> the scaled q.k^T of query rows [start, stop), before any bias."""
        k_t = np.swapaxes(self.kv_heads(self.k), -1, -2)
        return lambda start, stop: (self.q[..., start:stop, :] @ k_t) * self.scale

    def additive_scores(self, weight):
        """scores(start, stop) -> sum_d w_d tanh(q[i, d] + k[j, d]) of query rows [start, stop)."""
        k = self.kv_heads(self.k)
        return lambda start, stop: np.tanh(self.q[..., start:stop, None, :] + k[..., None, :, :]) @ weight

    def final(self, raw, start, stop):
        """Raw scores of rows [start, stop) -> the softmax's logits: softcap, ALiBi, mask, then -inf outside
        the causal / window band (the kernels' order)."""
        scores = raw
        if self.softcap is not None:
            scores = self.softcap * np.tanh(scores / self.softcap)
        diagonal = np.arange(start, stop)[:, None] + self.offset
        keys = np.arange(self.k.shape[-2])[None, :]
        if self.slopes is not None:
            scores = scores - self.slopes * np.abs(diagonal - keys)
        if self.mask is not None:
            chunk = self.mask[..., start:stop, :]
            scores = np.where(chunk, scores, -np.inf) if chunk.dtype == np.bool_ else scores + chunk
        if self.window is not None:
            left, right = self.window
            scores = np.where((keys >= diagonal - left) & (keys <= diagonal + right), scores, -np.inf)
        return scores

    def softmax(self, logits):
        """Probabilities and lse of logits (*lead, Hq, rows, Lk); the sink joins the denominator only.

        A row with nothing to attend (every logit -inf, no sink) gets probabilities 0 and lse -inf: the
        max is taken as 0 there so that exp(-inf) = 0 rather than NaN. NaN logits still propagate.
        """
        row_max = logits.max(axis=-1, keepdims=True) if logits.shape[-1] else np.full(logits.shape[:-1] + (1,), -np.inf)
        if self.sinks is not None:
            row_max = np.maximum(row_max, self.sinks)
        empty = np.isneginf(row_max)
        safe_max = np.where(empty, 0.0, row_max)
        weights = np.exp(logits - safe_max)
        denom = weights.sum(axis=-1, keepdims=True)
        if self.sinks is not None:
            denom = denom + np.exp(self.sinks - safe_max)
        denom = np.where(empty, 1.0, denom)
        return weights / denom, np.where(empty, -np.inf, safe_max + np.log(denom))[..., 0]

    def chunks(self, per_row_bytes):
        lq = self.q.shape[-2]
        rows = max(1, _CHUNK_BYTES // max(1, per_row_bytes))
        return ((start, min(lq, start + rows)) for start in range(0, lq, rows))

    def forward(self, scores_of):
        """float64 (out (*lead, Hq, Lq, Dv), lse (*lead, Hq, Lq))."""
        hq, lq, d = self.q.shape[-3:]
        lk, dv = self.v.shape[-2:]
        v = self.kv_heads(self.v)
        out = np.zeros(self.lead + (hq, lq, dv))
        lse = np.full(self.lead + (hq, lq), -np.inf)
        per_row = 8 * lk * hq * max(1, int(np.prod(self.lead))) * d  # the additive scores' (rows, Lk, D) temporary
        for start, stop in self.chunks(per_row):
            probs, lse[..., start:stop] = self.softmax(self.final(scores_of(start, stop), start, stop))
            out[..., start:stop, :] = (probs * self.keep(start, stop)) @ v
        return out, lse

    def weights(self, scores_of):
        hq, lq, d = self.q.shape[-3:]
        lk = self.k.shape[-2]
        weights = np.zeros(self.lead + (hq, lq, lk))
        for start, stop in self.chunks(8 * lk * hq * max(1, int(np.prod(self.lead))) * d):
            weights[..., start:stop, :] = self.softmax(self.final(scores_of(start, stop), start, stop))[0]
        return weights

    def backward(self, scores_of, dout, out, lse, weight=None):
        """float64 dq, dk, dv (kv heads), and dw for additive scores, dsinks with sinks, from the given out
        and lse: P = exp(s - lse) and D_i = rowsum(dout * out), as the kernels (and FlashAttention) do.

        Each sink is a key with value 0, so its probability exp(sink - lse_i) has the gradient
        P_sink * (0 - D_i), summed over the rows of its head.
        """
        hq, lq = self.q.shape[-3:-1]
        hkv = self.k.shape[-3]
        raw = scores_of(0, lq)
        logits = self.final(raw, 0, lq)
        d_out = _head_view(np.asarray(dout).astype(np.float64), self.rank)
        out64 = _head_view(np.asarray(out).astype(np.float64), self.rank)
        lse64 = _head_view(np.asarray(lse).astype(np.float64), self.rank)[..., None]  # lse follows q's rank rule
        # lse = -inf only where every logit is -inf: exp(-inf - 0) = 0 there, no NaN.
        probs = np.exp(logits - np.where(np.isneginf(lse64), 0.0, lse64))
        keep = self.keep(0, lq)
        k, v = self.kv_heads(self.k), self.kv_heads(self.v)
        d_v = np.swapaxes(probs * keep, -1, -2) @ d_out
        d_p = (d_out @ np.swapaxes(v, -1, -2)) * keep
        delta = (d_out * out64).sum(axis=-1, keepdims=True)
        d_s = probs * (d_p - delta)
        if self.softcap is not None:  # through s -> cap * tanh(s / cap): times 1 - tanh^2
            d_s = d_s * (1.0 - np.tanh(raw / self.softcap) ** 2)
        extra = ()
        if weight is None:
            d_q = self.scale * (d_s @ k)
            d_k = self.scale * (np.swapaxes(d_s, -1, -2) @ self.q)
        else:
            t = np.tanh(self.q[..., :, None, :] + k[..., None, :, :])  # (..., Lq, Lk, D): small shapes only
            g = d_s[..., None] * (1.0 - t * t) * weight
            d_q, d_k = g.sum(axis=-2), g.sum(axis=-3)
            extra = ((d_s[..., None] * t).sum(axis=tuple(range(t.ndim - 1))),)
        if self.sinks is not None:
            p_sink = np.exp(self.sinks - np.where(np.isneginf(lse64), 0.0, lse64))  # (*lead, Hq, Lq, 1)
            per_row = -(p_sink * delta)[..., 0]  # (*lead, Hq, Lq)
            extra += (per_row.sum(axis=-1).reshape(-1, hq).sum(axis=0),)

        def per_kv_head(grad):  # sum the query heads of each group onto their kv head
            return grad.reshape(grad.shape[:-3] + (hkv, self.group) + grad.shape[-2:]).sum(axis=-3)

        return (d_q, per_kv_head(d_k), per_kv_head(d_v)) + extra


def _result(out64, shape, dtype, out):
    result = out64.reshape(shape).astype(dtype if out is None else out.dtype)
    if out is not None:
        out[...] = result
        return out
    return result


def _additive_weight(score_weight, head_dim, dtype):
    return np.ones(head_dim) if score_weight is None else _rounded(score_weight, dtype)


def _is_block_diagonal(mask) -> bool:
    # Duck typing: masks.BlockDiagonal (or anything with the same offsets), without importing the API.
    return hasattr(mask, "cu_seqlens_q") and hasattr(mask, "cu_seqlens_k")


def _packed_view(x, rank):
    """Dense (..., H, total, D) with a single batch entry -> packed (total, H, D), a view."""
    x = _head_view(np.asarray(x), rank)
    return x.reshape(x.shape[-3:]).swapaxes(0, 1)


# ---------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------

def attention(q, k, v, *, mask=None, causal=False, scale=None, window=None, alibi_slopes=None, softcap=None,
              sinks=None, q_start=0, k_start=0, dropout_p=0.0, seed=None, k_scale=None, v_scale=None,
              return_lse=False, out=None, out_dtype=None, num_threads=None):
    """Softmax attention ``softmax(q @ k^T * scale + bias) @ v`` in float64 NumPy.

    Args:
        q: ``(..., Hq, Lq, D)``, or ``(B, Lq, D)`` / ``(Lq, D)`` with one implicit head.
        k, v: ``(..., Hkv, Lk, D)`` and ``(..., Hkv, Lk, Dv)``, ``Hq % Hkv == 0``; int8 with ``k_scale`` /
            ``v_scale`` of their shape without the last axis: the key used is ``k * k_scale[..., None]``.
        mask: bool (True = may attend) or float (added to the scores), broadcastable to
            ``(..., Hq, Lq, Lk)``; or a block-diagonal mask (an object with ``cu_seqlens_q`` and
            ``cu_seqlens_k``) over a single batch entry.
        causal: False, True / "top_left" or "bottom_right"; ``window=(left, right)`` (None or -1:
            unbounded); ``alibi_slopes`` ``(Hq,)`` or ``(..., Hq)``; ``softcap``; ``q_start`` /
            ``k_start`` the global positions of the first query and key: the kernels' position model.
        sinks: None or ``(Hq,)``: one logit per query head that joins each row's denominator with no
            value, ``out_i = sum_j e^{s_ij} v_j / (e^{sink} + sum_j e^{s_ij})``; lse includes it.
        dropout_p, seed: dropout on the key probabilities, with the kernels' hash of ``seed`` (an int).
        num_threads: ignored.

    Returns:
        ``out`` ``(..., Hq, Lq, Dv)`` in q's dtype (or ``out_dtype``, or written into ``out``), and with
        ``return_lse`` also ``lse`` ``(..., Hq, Lq)`` in the compute dtype (float32 for 16-bit inputs).
        A row with no key to attend gives 0 and lse ``-inf`` (lse = the sink with sinks).

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> q = k = v = np.ones((2, 4, 8), np.float32)
        >>> reference.attention(q, k, v).shape
        (2, 4, 8)
        >>> out, lse = reference.attention(q[:1, :1], k[:1, :1], v[:1, :1], sinks=np.zeros(1), return_lse=True)
        >>> round(float(out[0, 0, 0]), 4), round(float(lse[0, 0]), 4)  # e^s / (e^0 + e^s), log(1 + e^s); s = sqrt(8)
        (0.9442, 2.8859)
    """
    if _is_block_diagonal(mask):
        q, k, v = (np.asarray(x) for x in (q, k, v))
        packed = [_packed_view(x, q.ndim) for x in (q, _dequantised(k, k_scale), _dequantised(v, v_scale))]
        out_packed, lse_packed = attention_varlen(*packed, mask.cu_seqlens_q, mask.cu_seqlens_k, causal=causal,
                                                  scale=scale, window=window, alibi_slopes=alibi_slopes,
                                                  softcap=softcap, sinks=sinks, dropout_p=dropout_p, seed=seed,
                                                  return_lse=True)
        out64 = out_packed.swapaxes(0, 1)
        result = _result(out64, q.shape[:-1] + v.shape[-1:], q.dtype if out_dtype is None else out_dtype, out)
        return (result, lse_packed.reshape(q.shape[:-1])) if return_lse else result
    call = _Call(q, k, v, mask=mask, causal=causal, scale=scale, window=window, alibi_slopes=alibi_slopes,
                 softcap=softcap, q_start=q_start, k_start=k_start, sinks=sinks, dropout_p=dropout_p, seed=seed,
                 k_scale=k_scale, v_scale=v_scale)
    out64, lse64 = call.forward(call.dot_scores())
    result = _result(out64, call.out_shape, call.dtype if out_dtype is None else out_dtype, out)
    if return_lse:
        return result, lse64.reshape(call.lse_shape).astype(compute_dtype(call.dtype))
    return result


def additive_attention(q, k, v, *, score_weight=None, mask=None, causal=False, window=None, alibi_slopes=None,
                       softcap=None, q_start=0, k_start=0, dropout_p=0.0, seed=None, return_lse=False, out=None,
                       out_dtype=None, num_threads=None):
    """Additive (Bahdanau / Keras) attention in float64: ``score[i, j] = sum_d w_d tanh(q[i, d] + k[j, d])``.

    The arguments and result of :func:`attention` (no scale: the scores are not scaled), with
    ``score_weight`` ``w`` of shape ``(D,)`` (all ones when None).

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> q = k = v = np.ones((5, 8))
        >>> reference.additive_attention(q, k, v, score_weight=np.full(8, 0.5)).shape
        (5, 8)
    """
    call = _Call(q, k, v, mask=mask, causal=causal, scale=1.0, window=window, alibi_slopes=alibi_slopes,
                 softcap=softcap, q_start=q_start, k_start=k_start, dropout_p=dropout_p, seed=seed)
    weight = _additive_weight(score_weight, call.q.shape[-1], call.dtype)
    out64, lse64 = call.forward(call.additive_scores(weight))
    result = _result(out64, call.out_shape, call.dtype if out_dtype is None else out_dtype, out)
    if return_lse:
        return result, lse64.reshape(call.lse_shape).astype(compute_dtype(call.dtype))
    return result


def attention_weights(q, k, *, mask=None, causal=False, scale=None, kind="dot", score_weight=None, window=None,
                      alibi_slopes=None, softcap=None, sinks=None, q_start=0, k_start=0, num_threads=None):
    """The attention probabilities ``(..., Hq, Lq, Lk)`` in float64, cast to q's dtype.

    ``kind="dot"`` (scaled q.k^T) or ``"additive"`` (``score_weight`` as in :func:`additive_attention`,
    no scale); the other arguments as in :func:`attention`. With ``sinks`` each row sums to less than 1
    (the sink takes the rest).

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> w = reference.attention_weights(np.ones((3, 4)), np.ones((5, 4)))
        >>> w.shape, round(float(w.sum()), 6)
        ((3, 5), 3.0)
        >>> round(float(reference.attention_weights(np.ones((3, 4)), np.ones((5, 4)), sinks=[0.0]).sum()), 4)
        2.9209
    """
    if kind not in ("dot", "additive"):  # no meaning to compute; the API words the error
        raise ValueError(f"kind must be one of ('dot', 'additive'), got {kind!r}")
    call = _Call(q, k, k, mask=mask, causal=causal, scale=1.0 if kind == "additive" else scale, window=window,
                 alibi_slopes=alibi_slopes, softcap=softcap, q_start=q_start, k_start=k_start, sinks=sinks)
    scores_of = (call.additive_scores(_additive_weight(score_weight, call.q.shape[-1], call.dtype))
                 if kind == "additive" else call.dot_scores())
    return call.weights(scores_of).reshape(call.lse_shape + (call.k.shape[-2],)).astype(call.dtype)


def _gradients(call, grads, user_arrays, extra_dtype):
    shaped = tuple(g.reshape(np.shape(x)).astype(call.dtype) for g, x in zip(grads[:3], user_arrays))
    return shaped + tuple(g.astype(extra_dtype) for g in grads[3:])


def attention_backward(dout, q, k, v, out, lse, *, mask=None, causal=False, scale=None, window=None,
                       alibi_slopes=None, softcap=None, sinks=None, q_start=0, k_start=0, dropout_p=0.0, seed=None,
                       num_threads=None):
    """Gradients of :func:`attention` in float64: ``(dq, dk, dv)``, or ``(dq, dk, dv, dsinks)`` with sinks.

    ``out`` and ``lse`` are those of the forward call with the same arguments (``lse`` includes the
    sink); like the kernels, the probabilities are ``exp(s - lse)`` and ``D_i = rowsum(dout * out)``.
    ``dsinks_h = -sum_{batch, i} exp(sink_h - lse_i) D_i``, shape ``(Hq,)`` in the compute dtype;
    dq, dk, dv have the shapes and dtype of q, k, v.

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> q = k = v = np.ones((3, 2))
        >>> out, lse = reference.attention(q, k, v, return_lse=True)
        >>> [g.shape for g in reference.attention_backward(np.ones((3, 2)), q, k, v, out, lse)]
        [(3, 2), (3, 2), (3, 2)]
        >>> out, lse = reference.attention(q, k, v, sinks=[0.5], return_lse=True)
        >>> [g.shape for g in reference.attention_backward(np.ones((3, 2)), q, k, v, out, lse, sinks=[0.5])]
        [(3, 2), (3, 2), (3, 2), (1,)]
    """
    if _is_block_diagonal(mask):
        return _block_diagonal_backward(dout, q, k, v, out, lse, mask, causal=causal, scale=scale, window=window,
                                        alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks,
                                        dropout_p=dropout_p, seed=seed)
    call = _Call(q, k, v, mask=mask, causal=causal, scale=scale, window=window, alibi_slopes=alibi_slopes,
                 softcap=softcap, q_start=q_start, k_start=k_start, sinks=sinks, dropout_p=dropout_p, seed=seed)
    grads = call.backward(call.dot_scores(), dout, out, lse)
    return _gradients(call, grads, (q, k, v), compute_dtype(call.dtype))


def additive_attention_backward(dout, q, k, v, out, lse, *, score_weight=None, mask=None, causal=False,
                                window=None, alibi_slopes=None, softcap=None, q_start=0, k_start=0, dropout_p=0.0,
                                seed=None, num_threads=None):
    """Gradients of :func:`additive_attention` in float64: ``(dq, dk, dv, dscore_weight)``.

    As :func:`attention_backward`; ``dscore_weight`` has shape ``(D,)`` in the compute dtype.

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> q = k = v = np.ones((3, 2))
        >>> out, lse = reference.additive_attention(q, k, v, return_lse=True)
        >>> [g.shape for g in reference.additive_attention_backward(np.ones((3, 2)), q, k, v, out, lse)]
        [(3, 2), (3, 2), (3, 2), (2,)]
    """
    call = _Call(q, k, v, mask=mask, causal=causal, scale=1.0, window=window, alibi_slopes=alibi_slopes,
                 softcap=softcap, q_start=q_start, k_start=k_start, dropout_p=dropout_p, seed=seed)
    weight = _additive_weight(score_weight, call.q.shape[-1], call.dtype)
    grads = call.backward(call.additive_scores(weight), dout, out, lse, weight)
    return _gradients(call, grads, (q, k, v), compute_dtype(call.dtype))


def _block_diagonal_backward(dout, q, k, v, out, lse, mask, **kwargs):
    q = np.asarray(q)
    rank = q.ndim
    packed = [_packed_view(x, rank) for x in (dout, q, k, v, out)]
    lse_packed = _head_view(np.asarray(lse), rank - 1).reshape(-1, q.shape[-2])  # (H, total)
    grads = attention_varlen_backward(*packed[:4], packed[4], lse_packed, mask.cu_seqlens_q, mask.cu_seqlens_k,
                                      **kwargs)
    dense = tuple(g.swapaxes(0, 1).reshape(np.shape(x)) for g, x in zip(grads[:3], (q, k, v)))
    return dense + tuple(grads[3:])


def _sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window, alibi_slopes, softcap, sinks,
               dropout_p, seed):
    """(Call over (1, H, L_b, D) float64 copies, query rows, key rows) per sequence of a packed batch: the
    kernels treat sequence b as batch entry b (its dropout index too) with its own lengths."""
    cu_q, cu_k = (np.asarray(c).astype(np.int64) for c in (cu_seqlens_q, cu_seqlens_k))
    slopes = None if alibi_slopes is None else np.asarray(alibi_slopes)
    for b in range(cu_q.size - 1):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        views = [np.asarray(x)[rows].swapaxes(0, 1)[np.newaxis] for x, rows in ((q, rows_q), (k, rows_k), (v, rows_k))]
        call = _Call(*views, causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks,
                     alibi_slopes=None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b]),
                     dropout_p=dropout_p, seed=seed, first_batch=b)
        yield call, rows_q, rows_k


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                     scale=None, window=None, alibi_slopes=None, softcap=None, sinks=None, dropout_p=0.0, seed=None,
                     return_lse=False, out=None, num_threads=None):
    """:func:`attention` over a packed batch, one sequence at a time, in float64.

    q ``(total_q, Hq, D)``, k ``(total_k, Hkv, D)``, v ``(total_k, Hkv, Dv)``; sequence b owns rows
    ``cu_seqlens[b]:cu_seqlens[b + 1]``. Bottom-right alignment uses each sequence's own lengths;
    ``alibi_slopes`` is ``(Hq,)`` or ``(batch, Hq)``; ``max_seqlen_*`` are ignored. Returns out
    ``(total_q, Hq, Dv)`` and with ``return_lse`` lse ``(Hq, total_q)``.

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> cu = np.array([0, 2, 5])
        >>> reference.attention_varlen(np.ones((5, 1, 4)), np.ones((5, 1, 4)), np.ones((5, 1, 4)), cu, cu).shape
        (5, 1, 4)
    """
    q, v = np.asarray(q), np.asarray(v)
    result = np.zeros(q.shape[:2] + v.shape[-1:], q.dtype)
    lse = np.full(q.shape[1::-1], -np.inf, compute_dtype(q.dtype))
    for call, rows_q, _ in _sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window, alibi_slopes,
                                      softcap, sinks, dropout_p, seed):
        out64, lse64 = call.forward(call.dot_scores())
        result[rows_q] = out64[0].swapaxes(0, 1)
        lse[:, rows_q] = lse64[0]
    if out is not None:
        out[...] = result
        result = out
    return (result, lse) if return_lse else result


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                              max_seqlen_k=None, causal=False, scale=None, window=None, alibi_slopes=None,
                              softcap=None, sinks=None, dropout_p=0.0, seed=None, num_threads=None):
    """Gradients of :func:`attention_varlen` in float64: ``(dq, dk, dv)`` shaped like the packed q, k, v,
    and ``dsinks`` ``(Hq,)`` with sinks (summed over every sequence).

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> cu, x = np.array([0, 2, 5]), np.ones((5, 1, 4))
        >>> out, lse = reference.attention_varlen(x, x, x, cu, cu, return_lse=True)
        >>> [g.shape for g in reference.attention_varlen_backward(np.ones_like(out), x, x, x, out, lse, cu, cu)]
        [(5, 1, 4), (5, 1, 4), (5, 1, 4)]
    """
    q, dout, out, lse = (np.asarray(x) for x in (q, dout, out, lse))
    grads = [np.zeros(np.shape(x), q.dtype) for x in (q, k, v)]
    d_sinks = None if sinks is None else np.zeros(q.shape[1])
    for call, rows_q, rows_k in _sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window,
                                           alibi_slopes, softcap, sinks, dropout_p, seed):
        dout_b, out_b = (x[rows_q].swapaxes(0, 1)[np.newaxis] for x in (dout, out))
        seq_grads = call.backward(call.dot_scores(), dout_b, out_b, lse[:, rows_q][np.newaxis])
        for grad, seq_grad, rows in zip(grads, seq_grads, (rows_q, rows_k, rows_k)):
            grad[rows] = seq_grad[0].swapaxes(0, 1)
        if d_sinks is not None:
            d_sinks += seq_grads[3]
    if d_sinks is None:
        return tuple(grads)
    return tuple(grads) + (d_sinks.astype(compute_dtype(q.dtype)),)


def _gather(cache, scale, blocks, slots):
    """Tokens (blocks[t], slots[t]) of a paged cache -> float64 (Hkv, n, D), dequantised when scaled."""
    tokens = np.asarray(cache)[blocks, slots].astype(np.float64)  # (n, Hkv, D)
    if scale is not None:
        tokens = tokens * np.asarray(scale)[blocks, slots].astype(np.float64)[..., None]
    return tokens.swapaxes(0, 1)


def attention_paged(q, key_cache, value_cache, block_table, seq_lens, *, causal="bottom_right", scale=None,
                    window=None, alibi_slopes=None, softcap=None, sinks=None, k_scale=None, v_scale=None,
                    return_lse=False, out=None, num_threads=None):
    """:func:`attention` over a paged KV cache (vLLM's layout), one sequence at a time, in float64.

    Args:
        q: ``(B, Hq, Lq, D)``; query i of sequence b sits at position ``seq_lens[b] - Lq + i``.
        key_cache, value_cache: ``(num_blocks, block_size, Hkv, D)`` and ``(..., Dv)``; token t of sequence
            b is ``cache[block_table[b, t // block_size], t % block_size]``. int8 caches come with
            ``k_scale`` / ``v_scale`` of shape ``(num_blocks, block_size, Hkv)``.
        block_table: ``(B, max_blocks_per_seq)`` block ids; seq_lens: ``(B,)`` token counts.
        causal: "bottom_right" (default: each query sees the keys up to its own position; a query whose
            position is negative sees none), False (every one of the ``seq_lens[b]`` keys), or any other
            :func:`attention` alignment on the gathered keys; window and ALiBi measure from the same
            diagonal. ``alibi_slopes`` ``(Hq,)`` or ``(B, Hq)``; the rest as in :func:`attention`.

    Returns:
        out ``(B, Hq, Lq, Dv)`` in q's dtype, and with ``return_lse`` lse ``(B, Hq, Lq)``.

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> cache = np.arange(24.0).reshape(4, 2, 1, 3) / 24          # 4 blocks of 2 tokens, 1 kv head
        >>> table = np.array([[2, 0, 0], [1, 3, 0]], np.int32)         # sequence 1 reads blocks 1 then 3
        >>> q = np.ones((2, 1, 1, 3))
        >>> out = reference.attention_paged(q, cache, cache, table, np.array([1, 3]))
        >>> bool(np.allclose(out[0, 0, 0], cache[2, 0, 0]))           # one token: its value
        True
    """
    q = np.asarray(q)
    table, lengths = np.asarray(block_table), np.asarray(seq_lens)
    batch, hq, lq = q.shape[:3]
    block_size = np.shape(key_cache)[1]
    dv = np.shape(value_cache)[-1]
    result = np.zeros((batch, hq, lq, dv), q.dtype)
    lse = np.full((batch, hq, lq), -np.inf, compute_dtype(q.dtype))
    slopes = None if alibi_slopes is None else np.asarray(alibi_slopes)
    for b in range(batch):
        t = np.arange(int(lengths[b]))
        blocks, slots = table[b, t // block_size], t % block_size
        k_b, v_b = (_gather(c, s, blocks, slots)[np.newaxis]
                    for c, s in ((key_cache, k_scale), (value_cache, v_scale)))
        slopes_b = slopes if slopes is None or slopes.ndim == 1 else slopes[b:b + 1]
        result[b:b + 1], lse[b:b + 1] = attention(q[b:b + 1], k_b, v_b, causal=causal, scale=scale, window=window,
                                                  alibi_slopes=slopes_b, softcap=softcap, sinks=sinks,
                                                  return_lse=True)
    if out is not None:
        out[...] = result
        result = out
    return (result, lse) if return_lse else result
