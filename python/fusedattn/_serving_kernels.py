"""Temporary wiring of the serving kernels (issue #15) for their tests and benchmarks: sinks, int8 K / V
with per-token scales, paged K / V. Private; the public API (attention_paged, PagedKVCache, quantize_kv)
is built on top of the typed call spec, which will carry these inputs instead of extra `positions` keys.

The extra keys (read by convert_serving in cpp/bindings/module.cpp):
  sinks      (Hq,) contiguous, q's compute dtype (float32 for 16-bit q)
  k_scale    float32, k's shape without its last axis: (B, Hkv, Lk), or (num_blocks, block_size, Hkv) paged
  v_scale    likewise for v
  block_table (B, max_blocks) int32: k / v are (num_blocks, block_size, Hkv, D / Dv) caches
  seq_lens   (B,) int64 key lengths; query i of sequence b sits at key position seq_lens[b] - Lq + i
"""
from __future__ import annotations

import numpy as np

from . import _backend
from ._checks import _positions, compute_dtype


def _serving_call(q, k, v, *, sinks=None, k_scale=None, v_scale=None, block_table=None, seq_lens=None,
                  causal=False, scale=None, window=None, alibi_slopes=None, softcap=None, dropout_p=0.0, seed=0,
                  return_lse=False, num_threads=None):
    """attention(q, k, v) with the serving inputs; q is (B, Hq, Lq, D) (or (..., Hq, Lq, D) when not paged).

    Checks are the C++ invariants only: this is not a user-facing entry point.
    """
    hq, lq, d = q.shape[-3:]
    paged = block_table is not None
    lk = lq if (paged or seq_lens is not None) else k.shape[-2]  # per-sequence offsets come from seq_lens
    positions = _positions(causal, window, alibi_slopes, softcap, 0, 0, lq, lk, q.shape[:-3], hq, q.dtype)
    if dropout_p:
        positions["dropout_p"], positions["seed"] = float(dropout_p), int(seed)
    cdt = compute_dtype(q.dtype)
    if sinks is not None:
        positions["sinks"] = np.ascontiguousarray(sinks, dtype=cdt)
    if k_scale is not None:
        positions["k_scale"], positions["v_scale"] = k_scale, v_scale
    if paged:
        positions["block_table"] = np.ascontiguousarray(block_table, dtype=np.int32)
    if seq_lens is not None:
        positions["seq_lens"] = np.ascontiguousarray(seq_lens, dtype=np.int64)
    dv = v.shape[-1]
    out = np.empty(q.shape[:-1] + (dv,), dtype=q.dtype)
    lse = np.empty(q.shape[:-1], dtype=cdt) if return_lse else None
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    _backend._core.attention_forward(q, k, v, None, positions, float(scale), out, lse,
                                     num_threads or _backend.default_num_threads(), None, None)
    return (out, lse) if return_lse else out


def _serving_weights(q, k, *, sinks=None, causal=False, scale=None, num_threads=None):
    """attention_weights(q, k) with sinks: rows sum to less than 1."""
    hq, lq, d = q.shape[-3:]
    positions = _positions(causal, None, None, None, 0, 0, lq, k.shape[-2], q.shape[:-3], hq, q.dtype)
    if sinks is not None:
        positions["sinks"] = np.ascontiguousarray(sinks, dtype=compute_dtype(q.dtype))
    weights = np.zeros(q.shape[:-1] + (k.shape[-2],), dtype=q.dtype)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    _backend._core.attention_weights(q, k, None, positions, float(scale), None, weights,
                                     num_threads or _backend.default_num_threads())
    return weights
