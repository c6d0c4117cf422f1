"""Validators of single attention arguments, composed into whole calls by :mod:`fusedattn._spec`.

Everything a user can get wrong is caught here, with a message that names the argument, what was
expected and what was received, so that the C++ core only ever sees consistent inputs.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np

# Rules the oracle needs to compute live there (it imports nothing of the package); they stay importable
# from here for the callers that know them by this address.
from .reference import compute_dtype, dropout_keep_factor, is_half_dtype  # noqa: F401

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def is_attention_dtype(dtype) -> bool:
    """float32, float64, float16 or bfloat16: what the kernels take."""
    return np.dtype(dtype) in SUPPORTED_DTYPES or is_half_dtype(dtype)


def _is_float(dtype) -> bool:
    """A floating dtype, bfloat16 included (NumPy does not count ml_dtypes' bfloat16 as np.floating)."""
    return np.issubdtype(dtype, np.floating) or is_half_dtype(dtype)


def _is_real(dtype) -> bool:
    return np.dtype(dtype) != np.bool_ and (_is_float(dtype) or np.issubdtype(dtype, np.integer))


def _max_head_dim() -> int:
    """The largest D and Dv: the C++ core's one constant (fusedattn/limits.h), 512 for the NumPy fallback."""
    from . import _backend

    return int(getattr(_backend._core, "MAX_HEAD_DIM", 512))


MAX_HEAD_DIM = _max_head_dim()
_CAUSAL_CHOICES = (False, True, "top_left", "bottom_right")
_TooHardError = getattr(getattr(np, "exceptions", np), "TooHardError", Exception)


def as_float_array(x, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:  # ragged lists, objects numpy cannot hold
            raise TypeError(f"{name} must be a float32 or float64 array; could not convert {type(x).__name__}: {exc}") from None
    if not is_attention_dtype(x.dtype):
        raise TypeError(f"{name} must have dtype float32, float64, float16 or bfloat16 (ml_dtypes), got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have shape (L, D), (B, L, D) or (..., H, L, D) (at least 2 dimensions), "
            f"got shape {x.shape}"
        )
    return x


def check_positive_int(value, name: str, *, upper=None) -> int:
    """A size argument of a layer or a cache: an int >= 1 (and <= upper when given)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1 or (upper is not None and value > upper):
        bounds = f"between 1 and {upper}" if upper is not None else ">= 1"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return int(value)


_DTYPE_CHOICES = "float32 or float64 (or 16-bit: float16, ml_dtypes.bfloat16)"


def check_storage_dtype(dtype, name: str = "dtype") -> np.dtype:
    """A layer's or a cache's storage dtype: one the kernels take (float32, float64, float16, bfloat16)."""
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be {_DTYPE_CHOICES}, got {dtype!r}") from None
    if not is_attention_dtype(resolved):
        raise TypeError(f"{name} must be {_DTYPE_CHOICES}, got {resolved}")
    return resolved


def check_num_threads(num_threads) -> Optional[int]:
    if num_threads is None:
        return None
    if type(num_threads) is not int and (isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral)):
        raise TypeError(f"num_threads must be a positive int or None, got {type(num_threads).__name__}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return int(num_threads)


def check_alignment(causal) -> bool:
    """True when the diagonal is top-left aligned (torch's is_causal), False for bottom-right."""
    if isinstance(causal, (bool, np.bool_)):
        return bool(causal)
    if isinstance(causal, str) and causal in _CAUSAL_CHOICES:
        return causal == "top_left"
    raise ValueError(f"causal must be one of False, True, 'top_left', 'bottom_right'; got {causal!r}")


def check_int(value, name: str, *, minimum=None) -> int:
    # type() is int first: the common case, without numbers.Integral's (slow) ABC check on every call
    if type(value) is not int and (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_window(window):
    """(left, right) with None or -1 for an unbounded side (FlashAttention's convention)."""
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be a pair (left, right) of ints (None or -1: unbounded), got {window!r}")
    bounds = []
    for side, value in zip(("left", "right"), window):
        if value is None or (not isinstance(value, (bool, np.bool_)) and isinstance(value, numbers.Integral) and value == -1):
            bounds.append(UNBOUNDED)
        else:
            bounds.append(check_int(value, f"window {side}", minimum=0))
    return tuple(bounds)


UNBOUNDED = 1 << 60  # a window side that never binds (the kernel's kUnbounded)


def is_causal(causal) -> bool:
    """Whether ``causal`` (already checked by check_alignment) restricts keys at all."""
    return causal is not False and not (isinstance(causal, np.bool_) and not causal)


def check_out_dtype(out_dtype, dtype) -> np.dtype:
    """``out_dtype``: None (the inputs' dtype) or float32, which 16-bit inputs may ask for."""
    if out_dtype is None:
        return np.dtype(dtype)
    try:
        resolved = np.dtype(out_dtype)
    except TypeError:
        raise TypeError(f"out_dtype must be None or a dtype, got {out_dtype!r}") from None
    if resolved != np.dtype(dtype) and not (resolved == np.float32 and is_half_dtype(dtype)):
        raise TypeError(f"out_dtype must be the inputs' dtype {np.dtype(dtype)} or, for 16-bit inputs, float32; "
                        f"got {resolved}")
    return resolved


def check_out(out, out_shape, dtype, inputs, out_dtype=None) -> np.ndarray:
    """Validate a user-supplied ``out`` array: shape, dtype, writeable, and not aliasing any input."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != tuple(out_shape):
        raise ValueError(f"out must have shape {tuple(out_shape)} (q's shape with v's last axis), got {out.shape}")
    expected = np.dtype(dtype if out_dtype is None else out_dtype)
    if out.dtype != expected:
        raise TypeError(f"out must have dtype {expected} (the output's dtype), got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out must be writeable, got a read-only array")
    for name, arr in inputs:
        if arr is not None and _overlaps(out, arr):
            raise ValueError(f"out must not overlap {name}: the kernel reads {name} while writing out")
    return out


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=1_000_000))
    except _TooHardError:
        return True  # cannot prove disjointness cheaply: refuse rather than risk a silent wrong answer


_SCORE_KINDS = ("dot", "additive")


def check_kind(kind) -> str:
    if not isinstance(kind, str) or kind not in _SCORE_KINDS:
        raise ValueError(f"kind must be one of {_SCORE_KINDS}, got {kind!r}")
    return kind


def check_score_weight(score_weight, head_dim: int, dtype) -> np.ndarray:
    """The additive score's weight vector ``w`` of shape ``(D,)``: all ones when None, else validated."""
    if score_weight is None:
        return np.ones(head_dim, dtype=compute_dtype(dtype))
    weight = np.asarray(score_weight)
    if not _is_real(weight.dtype):
        raise TypeError(f"score_weight must be a real-valued array of shape ({head_dim},), got dtype {weight.dtype}")
    if weight.shape != (head_dim,):
        raise ValueError(f"score_weight must have shape ({head_dim},) (the head dim D of q and k), got {weight.shape}")
    return np.ascontiguousarray(weight, dtype=compute_dtype(dtype))


def check_like(x, name: str, shape: tuple, dtype) -> np.ndarray:
    """An input that must match a computed shape and dtype exactly (dout, out, lse of the backward pass)."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (what these inputs produce), got {x.dtype}")
    if x.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {x.shape}")
    return x


def check_dropout(dropout_p, seed, *, need_seed: bool = False):
    """Validate ``dropout_p`` and turn ``seed`` (int or numpy Generator) into the kernel's uint64 seed.

    Returns ``{}`` without dropout, else ``{"dropout_p": p, "seed": s}`` to merge into the positions.
    """
    if isinstance(dropout_p, (bool, np.bool_)) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0:
        return {}
    if seed is None:
        if need_seed:
            raise ValueError("seed is required with dropout_p > 0 here: pass the seed the forward pass used "
                             "(attention_vjp does this for you)")
        seed = np.random.default_rng()
    if isinstance(seed, np.random.Generator):
        seed = int(seed.integers(0, 2**63, dtype=np.int64))
    elif isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or a numpy.random.Generator, got {type(seed).__name__}")
    elif not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return {"dropout_p": float(dropout_p), "seed": int(seed)}


PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's words


def check_precision(precision) -> str:
    """Validate ``precision`` (how float32 products may run). The C++ core honours it for float32 on the amx
    level only (bf16x3 / bf16 products on the tiles) and runs the ``"highest"`` path everywhere else."""
    if not isinstance(precision, str):
        raise TypeError(f"precision must be a str, one of 'highest', 'high' or 'medium'; "
                        f"got {type(precision).__name__} {precision!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'highest', 'high' or 'medium' (the words of "
                         f"torch.set_float32_matmul_precision), got {precision!r}")
    return str(precision)
