"""TEMPORARY test shim (issue #15): ``sinks=``, ``k_scale=`` / ``v_scale=`` on the public API, in NumPy.

Delete this file when the fused kernels are wired into :func:`fusedattn.attention` /
:func:`fusedattn.attention_backward`. Nothing in the package imports it: only the tests do (through
``tests/conftest.py``'s ``provisional_api`` fixture), and :func:`install` does nothing once the real
API already takes ``sinks=``, so the tests run unchanged against the real kernels.

The post-processing is exact (up to the usual rounding):

* int8 K/V: dequantised to q's compute dtype, ``k_int8 * k_scale[..., None]``.
* sinks: with ``lse0`` the row's log-sum-exp without the sink, ``out = out0 / (1 + exp(sink - lse0))``
  and ``lse = logaddexp(lse0, sink)``.
* backward: the probabilities recomputed from the sink-including ``lse`` are the ones with the sink, and
  ``D_i = rowsum(dout * out)`` is unchanged by a valueless extra column, so the kernel's ``dq, dk, dv``
  are already right; ``dsinks_h = -sum_{b,i} exp(sink_h - lse_{b,h,i}) * D_{b,h,i}``.
"""
from __future__ import annotations

import inspect

import numpy as np

import fusedattn
from ._checks import compute_dtype


def _sink_column(sinks, lse):
    """``sinks`` (Hq,) shaped to broadcast against an lse of shape (..., Hq, Lq) (or (..., Lq) without a head axis)."""
    s = np.asarray(sinks, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"sinks must have shape (Hq,), got {s.shape}")
    return s[:, None] if lse.ndim >= 2 else s


def _dequantize(x, scale, name, dtype):
    if scale is None:
        raise ValueError(f"{name} is int8: pass its per-token scale ({name[0]}_scale=) too")
    scale = np.asarray(scale)
    if scale.dtype != np.float32 or scale.shape != x.shape[:-1]:
        raise ValueError(f"{name[0]}_scale must be float32 of shape {x.shape[:-1]}, got {scale.dtype} {scale.shape}")
    return (x.astype(np.float32) * scale[..., None]).astype(dtype)


def make_attention(original):
    def attention(q, k, v, *, sinks=None, k_scale=None, v_scale=None, return_lse=False, out=None, **kwargs):
        q_dtype = np.asarray(q).dtype
        if np.asarray(k).dtype == np.int8 or k_scale is not None:
            k = _dequantize(np.asarray(k), k_scale, "k", q_dtype)
        if np.asarray(v).dtype == np.int8 or v_scale is not None:
            v = _dequantize(np.asarray(v), v_scale, "v", q_dtype)
        if sinks is None:
            return original(q, k, v, return_lse=return_lse, out=out, **kwargs)
        out0, lse0 = original(q, k, v, return_lse=True, **kwargs)
        s = _sink_column(sinks, lse0)
        lse0_64 = lse0.astype(np.float64)
        factor = 1.0 / (1.0 + np.exp(s - lse0_64))  # 0 for rows that see no key (lse0 = -inf)
        result = (out0.astype(np.float64) * factor[..., None]).astype(out0.dtype)
        lse = np.logaddexp(lse0_64, s).astype(lse0.dtype)
        if out is not None:
            out[...] = result
            result = out
        return (result, lse) if return_lse else result

    return attention


def make_attention_backward(original):
    def attention_backward(dout, q, k, v, out, lse, *, sinks=None, k_scale=None, v_scale=None, **kwargs):
        if k_scale is not None or v_scale is not None:
            raise NotImplementedError("the provisional shim has no backward for int8 K/V")
        grads = original(dout, q, k, v, out, lse, **kwargs)
        if sinks is None:
            return grads
        lse64 = np.asarray(lse, dtype=np.float64)
        s = _sink_column(sinks, lse64)
        rowsum = np.sum(np.asarray(dout, np.float64) * np.asarray(out, np.float64), axis=-1)
        contrib = -np.exp(s - lse64) * rowsum
        head_axis = lse64.ndim - 2
        axes = tuple(a for a in range(lse64.ndim) if a != head_axis) if lse64.ndim >= 2 else None
        dsinks = contrib.sum(axis=axes).reshape(-1).astype(compute_dtype(np.asarray(q).dtype))
        return (*grads, dsinks)

    return attention_backward


def needed() -> bool:
    """Whether the public API still lacks ``sinks=`` / ``k_scale=`` (the kernels are not wired yet)."""
    return "sinks" not in inspect.signature(fusedattn.attention).parameters


def install(monkeypatch=None) -> None:
    """Patch fusedattn.attention / attention_backward: for one test with pytest's ``monkeypatch`` (which
    undoes it), or for the whole process without (a subprocess running an example)."""
    if not needed():
        return
    setattr_ = monkeypatch.setattr if monkeypatch is not None else setattr
    setattr_(fusedattn, "attention", make_attention(fusedattn.attention))
    setattr_(fusedattn, "attention_backward", make_attention_backward(fusedattn.attention_backward))
