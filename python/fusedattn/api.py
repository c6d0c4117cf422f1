"""The public attention API: validation in Python, the computation in the fused C++ kernel."""
from __future__ import annotations

import numpy as np

from . import _backend, reference
from ._checks import check_num_threads, check_out, head_view, prepare

__all__ = ["attention", "backend_info", "set_num_threads", "get_num_threads"]

try:
    from importlib.metadata import PackageNotFoundError, version as _dist_version

    __version__ = _dist_version("fusedattn")
except Exception:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def attention(q, k, v, *, mask=None, causal=False, scale=None, return_lse=False, out=None, num_threads=None):
    """Fused scaled dot-product attention: ``softmax(q @ k^T * scale + mask) @ v``.

    Computed tile by tile with an online softmax: the ``Lq x Lk`` score matrix is never stored.

    Args:
        q: ``(..., Hq, Lq, D)`` queries; ``(B, Lq, D)`` means one head, ``(Lq, D)`` one sequence.
        k: ``(..., Hkv, Lk, D)`` keys, same leading dims as q. ``Hq % Hkv == 0``: query head ``h``
            uses kv head ``h // (Hq // Hkv)`` (grouped-query / multi-query attention).
        v: ``(..., Hkv, Lk, Dv)`` values; ``Dv`` may differ from ``D`` (both 1..512).
        mask: optional, broadcastable to ``(..., Hq, Lq, Lk)``. ``bool``: True = may attend (torch's
            convention). float: added to the scaled scores (``-inf`` forbids). Broadcasting is done
            with zero strides, never by copying.
        causal: ``False``; ``True`` or ``"top_left"`` (query i sees keys ``j <= i``, torch's
            ``is_causal``); ``"bottom_right"`` (query i sees keys ``j <= i + Lk - Lq``, the
            FlashAttention / KV-cache convention). Combines with ``mask``.
        scale: multiplies ``q @ k^T``; default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp of each row's scaled, masked scores.
        out: optional array of the output's shape and dtype to write into (must not overlap inputs).
        num_threads: OpenMP threads for this call (default: :func:`get_num_threads`).

    Returns:
        ``out`` of shape ``(..., Hq, Lq, Dv)`` in the inputs' dtype (float32 or float64), and with
        ``return_lse=True`` a tuple ``(out, lse)`` with ``lse`` of shape ``(..., Hq, Lq)``.
        A query row that may attend no key gets output 0 and lse ``-inf`` (torch >= 2.5 also gives 0).

    Any strides are read directly (transposed ``(B, L, H, D)`` layouts via ``swapaxes``, slices of a
    preallocated cache). The GIL is released while the kernel runs.

    Example:
        >>> import numpy as np, fusedattn as fa
        >>> q = k = v = np.random.rand(2, 8, 128, 64).astype(np.float32)
        >>> fa.attention(q, k, v, causal=True).shape
        (2, 8, 128, 64)
    """
    threads = check_num_threads(num_threads)
    if _backend._core is None:
        return reference.attention(q, k, v, mask=mask, causal=causal, scale=scale, return_lse=return_lse, out=out)
    p = prepare(q, k, v, mask=mask, causal=causal, scale=scale)
    if out is None:
        out = np.empty(p.out_shape, dtype=p.q.dtype)
    else:
        check_out(out, p, (("q", p.q), ("k", p.k), ("v", p.v), ("mask", p.mask)))
    lse = np.empty(p.lse_shape, dtype=p.q.dtype) if return_lse else None
    _backend._core.attention_forward(
        p.q, p.k, p.v, p.mask, p.causal_offset, p.scale,
        head_view(out, p.user_rank),
        None if lse is None else head_view(lse, p.user_rank),
        threads or _backend.default_num_threads(),
    )
    return (out, lse) if return_lse else out


def set_num_threads(num_threads: int) -> None:
    """Bound the OpenMP threads every later call uses (``None`` restores the default)."""
    _backend._num_threads = check_num_threads(num_threads)


def get_num_threads() -> int:
    """The number of threads a call without ``num_threads=`` uses."""
    return _backend.default_num_threads()


def backend_info() -> dict:
    """What this installation runs on.

    Returns a dict: ``isa`` (the selected instruction-set path), ``compiled_isas``, ``supported_isas``
    (compiled and runnable on this CPU), ``num_threads``, ``openmp``, ``version``, ``cuda`` (whether the
    CUDA path was built), and ``extension`` (False when running on the NumPy reference fallback).

    Example:
        >>> import fusedattn as fa
        >>> fa.backend_info()["isa"] in fa.backend_info()["compiled_isas"]
        True
    """
    core = _backend._core
    if core is None:
        return {"isa": "reference", "compiled_isas": ["reference"], "supported_isas": ["reference"],
                "num_threads": 1, "openmp": False, "version": __version__, "cuda": False, "extension": False}
    return {
        "isa": core.current_isa(),
        "compiled_isas": list(core.compiled_isas()),
        "supported_isas": list(core.supported_isas()),
        "num_threads": get_num_threads(),
        "openmp": bool(core.openmp()),
        "version": __version__,
        "cuda": bool(core.cuda_built()),
        "extension": True,
    }
