"""int8 key/value quantisation with one float32 scale per token (per row of the last axis)."""
from __future__ import annotations

import numpy as np

from ._checks import is_attention_dtype

__all__ = ["quantize_kv"]

# The smallest positive float32 (a subnormal): the scale of a row so tiny that max|x| / 127 underflows.
_TINY_SCALE = np.float32(np.finfo(np.float32).smallest_subnormal)


def quantize_kv(x):
    """Symmetric per-token int8 quantisation of keys or values: ``x ≈ x_int8 * scale[..., None]``.

    Each row of the last axis (one token of one head, e.g. ``x[b, h, t, :]``) gets its own scale
    ``max|row| / 127``, and ``x_int8 = clip(rint(x / scale), -127, 127)`` (0 for an all-zero row, whose
    scale is 0). Rounding to nearest bounds the error of every element by half its row's scale:
    ``|x - x_int8 * scale| <= scale / 2``. -128 is never used, so the code is symmetric.

    This is the storage format of ``KVCache(..., dtype=np.int8)`` and ``PagedKVCache(..., dtype=np.int8)``,
    and what :func:`fusedattn.attention` / :func:`fusedattn.attention_paged` take as int8 K/V with
    ``k_scale=`` / ``v_scale=``.

    Args:
        x: ``(..., D)`` float32, float64, float16 or bfloat16 (ml_dtypes), at least 1-D, all finite.
            The division is done in float64 whatever the input dtype.

    Returns:
        ``(x_int8, scale)``: ``x_int8`` int8 of ``x``'s shape, ``scale`` float32 of shape ``x.shape[:-1]``.

    Raises:
        TypeError: ``x`` is not a float array of a supported dtype.
        ValueError: ``x`` is 0-D or holds NaN / inf.

    Example:
        >>> import numpy as np
        >>> from fusedattn import quantize_kv
        >>> x = np.array([[0.5, -1.27, 0.0], [0.0, 0.0, 0.0]], np.float32)
        >>> x_int8, scale = quantize_kv(x)
        >>> x_int8
        array([[  50, -127,    0],
               [   0,    0,    0]], dtype=int8)
        >>> scale
        array([0.01, 0.  ], dtype=float32)
        >>> bool(np.all(np.abs(x - x_int8 * scale[:, None]) <= scale[:, None] / 2))
        True
    """
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"x must be a float array; could not convert {type(x).__name__}: {exc}") from None
    if not is_attention_dtype(x.dtype):
        raise TypeError(f"x must have dtype float32, float64, float16 or bfloat16 (ml_dtypes), got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension (the quantised rows are its last axis), got shape {x.shape}")
    # float64 holds every supported dtype exactly (bfloat16 converts through its own astype), so the
    # only rounding below is the one of the scale to float32 and of x / scale to an integer.
    x64 = x.astype(np.float64)
    if not np.all(np.isfinite(x64)):
        raise ValueError("x must be finite: it holds NaN or inf, which an int8 code with a finite scale cannot represent")
    amax = np.max(np.abs(x64), axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1])
    scale = (amax / 127.0).astype(np.float32)
    # A nonzero row whose scale underflows to 0 would be stored as zeros with an error bound of 0.
    scale = np.where((scale == 0) & (amax > 0), _TINY_SCALE, scale).astype(np.float32)
    # Divide by the scale as stored (float32), so that dequantising with it is what the bound is about.
    safe = np.where(scale == 0, 1.0, scale.astype(np.float64))
    codes = np.clip(np.rint(x64 / safe[..., None]), -127, 127)
    return codes.astype(np.int8), scale
