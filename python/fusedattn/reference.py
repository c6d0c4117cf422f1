"""Pure-NumPy float64 reference: the oracle of every test, and the fallback without the extension.

Same signatures and semantics as :mod:`fusedattn`; the scores are materialised (in query chunks, to
bound memory), computed in float64 and cast back to the input dtype.
"""
from __future__ import annotations

import numpy as np

from ._checks import check_num_threads, check_out, prepare

__all__ = ["attention"]

_CHUNK_BYTES = 64 << 20  # bound the float64 score chunk so the fallback never needs O(Lq*Lk) per head at once


def attention(q, k, v, *, mask=None, causal=False, scale=None, return_lse=False, out=None, num_threads=None):
    """Softmax attention ``softmax(q @ k^T * scale + mask) @ v`` in float64 NumPy.

    Takes exactly the arguments of :func:`fusedattn.attention` (``num_threads`` is accepted and
    ignored) and returns the same result: ``out`` of shape ``(..., Hq, Lq, Dv)`` in the input dtype,
    and with ``return_lse=True`` also ``lse`` of shape ``(..., Hq, Lq)``. Rows with no key they may
    attend give 0 and lse ``-inf``.

    Example:
        >>> import numpy as np
        >>> from fusedattn import reference
        >>> q = k = v = np.ones((2, 4, 8), np.float32)
        >>> reference.attention(q, k, v).shape
        (2, 4, 8)
    """
    check_num_threads(num_threads)
    p = prepare(q, k, v, mask=mask, causal=causal, scale=scale)
    if out is not None:
        check_out(out, p, (("q", p.q), ("k", p.k), ("v", p.v), ("mask", p.mask)))
    out64, lse64 = _attention_f64(p)
    dtype = p.q.dtype
    result = out64.reshape(p.out_shape).astype(dtype)
    if out is not None:
        out[...] = result
        result = out
    if return_lse:
        return result, lse64.reshape(p.lse_shape).astype(dtype)
    return result


def _attention_f64(p):
    lead = p.q.shape[:-3]
    hq, lq, _ = p.q.shape[-3:]
    hkv, lk, dv = p.v.shape[-3:]
    group = hq // hkv
    q = p.q.astype(np.float64)
    # Query head h reads kv head h // group: repeat kv heads (a copy, which the kernel never makes).
    k = np.repeat(p.k.astype(np.float64), group, axis=-3)
    v = np.repeat(p.v.astype(np.float64), group, axis=-3)
    out = np.zeros(lead + (hq, lq, dv))
    lse = np.full(lead + (hq, lq), -np.inf)
    rows_per_chunk = max(1, _CHUNK_BYTES // max(1, 8 * lk * hq * max(1, int(np.prod(lead)))))
    if lk == 0:
        return out, lse  # no key at all: every row attends nothing
    key_index = np.arange(lk)
    for start in range(0, lq, rows_per_chunk):
        stop = min(lq, start + rows_per_chunk)
        scores = (q[..., start:stop, :] @ np.swapaxes(k, -1, -2)) * p.scale
        if p.mask is not None:
            chunk_mask = p.mask[..., start:stop, :]
            if chunk_mask.dtype == np.bool_:
                scores = np.where(chunk_mask, scores, -np.inf)
            else:
                scores = scores + chunk_mask.astype(np.float64)
        if p.causal_offset is not None:
            allowed = key_index[None, :] <= np.arange(start, stop)[:, None] + p.causal_offset
            scores = np.where(allowed, scores, -np.inf)
        row_max = scores.max(axis=-1, keepdims=True)
        # A row whose every score is -inf attends nothing: subtract 0 there so its weights are exp(-inf) = 0
        # rather than NaN, and divide by 1 so it outputs 0. NaN scores still propagate, as they should.
        attends_nothing = np.isneginf(row_max)
        safe_max = np.where(attends_nothing, 0.0, row_max)
        weights = np.exp(scores - safe_max)
        denom = np.where(attends_nothing, 1.0, weights.sum(axis=-1, keepdims=True))
        out[..., start:stop, :] = (weights / denom) @ v
        lse[..., start:stop] = np.where(attends_nothing, -np.inf, safe_max + np.log(denom))[..., 0]
    return out, lse
