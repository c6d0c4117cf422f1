"""fusedattn: fused, tiled, SIMD + OpenMP softmax attention for NumPy.

>>> import numpy as np, fusedattn as fa
>>> q = k = v = np.random.rand(2, 8, 128, 64).astype(np.float32)
>>> fa.attention(q, k, v).shape
(2, 8, 128, 64)
"""
from . import masks, reference
from .api import (
    __version__,
    additive_attention,
    additive_attention_backward,
    attention,
    attention_backward,
    attention_vjp,
    attention_weights,
    backend_info,
    get_num_threads,
    set_num_threads,
)
from .kv_cache import KVCache
from .layers import AdditiveAttention, MultiHeadAttention
from .merge import merge_attention
from .paged import PagedKVCache, attention_paged
from .quant import quantize_kv
from .varlen import attention_varlen, attention_varlen_backward

__all__ = [
    "attention",
    "additive_attention",
    "attention_weights",
    "attention_backward",
    "attention_vjp",
    "additive_attention_backward",
    "backend_info",
    "get_num_threads",
    "set_num_threads",
    "merge_attention",
    "attention_varlen",
    "attention_varlen_backward",
    "MultiHeadAttention",
    "AdditiveAttention",
    "KVCache",
    "PagedKVCache",
    "attention_paged",
    "quantize_kv",
    "plot",
    "masks",
    "reference",
    "__version__",
]

# Submodules with optional dependencies or heavier imports load on first access: `fusedattn.dask` (dask),
# `fusedattn.plot` (matplotlib), `fusedattn.cuda` (the CUDA extension), `fusedattn.cli`. A plain
# `import fusedattn` stays within a few ms of NumPy's own import.
_LAZY_SUBMODULES = ("cli", "cuda", "dask", "plot")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fusedattn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
