"""A preallocated key/value cache for incremental (token-by-token) decoding on the fused kernel."""
from __future__ import annotations

import numpy as np

import fusedattn  # fusedattn.attention is looked up at call time

from ._checks import (MAX_HEAD_DIM, check_positive_int as _check_positive_int, check_storage_dtype as _check_dtype,
                      is_attention_dtype)
from .quant import quantize_kv

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of the tokens decoded so far, in buffers allocated once for ``max_len`` tokens.

    :meth:`append` writes new tokens' keys/values in place; :meth:`attend` runs
    :func:`fusedattn.attention` for new queries against everything cached. :attr:`keys` and
    :attr:`values` are views of the filled prefix of the buffers, which the kernel reads through their
    strides: a decoding step copies nothing but the new tokens.

    Args:
        batch: number of sequences decoded together.
        num_kv_heads: key/value heads Hkv. Queries may have any multiple of it (grouped-query attention).
        max_len: capacity in tokens.
        head_dim: D, the key (and query) head dim, 1..512.
        value_dim: Dv, the value head dim, 1..512 (default ``head_dim``).
        dtype: float32 or float64, for the buffers and every array appended or attended; or float16 /
            ``ml_dtypes.bfloat16``: 16-bit buffers (half the memory of float32), attended by the fused
            kernel with float32 accumulation, the output in the cache's 16-bit dtype; or ``np.int8``:
            keys and values quantised on append by :func:`fusedattn.quantize_kv` (one float32 scale per
            token and kv head, a quarter of float32's bytes plus the scales), appended as any float dtype,
            attended with queries of any float dtype (the output in q's dtype); the kernel reads the int8
            buffers and their scales (``k_scale=`` / ``v_scale=``) and dequantises inside its loop, never in a
            copy.

    Buffers: :attr:`key_buffer` ``(batch, num_kv_heads, max_len, head_dim)`` and :attr:`value_buffer`
    ``(batch, num_kv_heads, max_len, value_dim)``; int8 caches also :attr:`key_scale_buffer` and
    :attr:`value_scale_buffer` ``(batch, num_kv_heads, max_len)`` float32. Their unfilled tail is never read.

    Example:
        >>> import numpy as np
        >>> from fusedattn.kv_cache import KVCache
        >>> cache = KVCache(1, 2, max_len=16, head_dim=8)
        >>> rng = np.random.default_rng(0)
        >>> for step in range(3):                              # one token per step
        ...     k, v = (rng.standard_normal((1, 2, 1, 8), dtype=np.float32) for _ in "kv")
        ...     cache.append(k, v)
        ...     q = rng.standard_normal((1, 4, 1, 8), dtype=np.float32)   # 4 query heads share 2 kv heads
        ...     out = cache.attend(q)
        >>> len(cache), cache.keys.shape, out.shape
        (3, (1, 2, 3, 8), (1, 4, 1, 8))
    """

    def __init__(self, batch, num_kv_heads, max_len, head_dim, *, value_dim=None, dtype=np.float32):
        self.batch = _check_positive_int(batch, "batch")
        self.num_kv_heads = _check_positive_int(num_kv_heads, "num_kv_heads")
        self.max_len = _check_positive_int(max_len, "max_len")
        self.head_dim = _check_positive_int(head_dim, "head_dim", upper=MAX_HEAD_DIM)
        self.value_dim = self.head_dim if value_dim is None else _check_positive_int(value_dim, "value_dim", upper=MAX_HEAD_DIM)
        try:
            is_int8 = np.dtype(dtype) == np.int8
        except TypeError:
            is_int8 = False
        self.dtype = np.dtype(np.int8) if is_int8 else _check_dtype(dtype)
        #: Whether keys/values are stored as int8 with per-token float32 scales.
        self.quantized = is_int8
        # np.zeros maps pages lazily: a large capacity costs memory only as it is filled.
        self._k = np.zeros((self.batch, self.num_kv_heads, self.max_len, self.head_dim), self.dtype)
        self._v = np.zeros((self.batch, self.num_kv_heads, self.max_len, self.value_dim), self.dtype)
        self._k_scale = self._v_scale = None
        if is_int8:
            self._k_scale = np.zeros((self.batch, self.num_kv_heads, self.max_len), np.float32)
            self._v_scale = np.zeros((self.batch, self.num_kv_heads, self.max_len), np.float32)
        self._length = 0

    # -- state --------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        """Number of tokens cached."""
        return self._length

    def __len__(self) -> int:
        return self._length

    @property
    def key_buffer(self) -> np.ndarray:
        """The whole preallocated key buffer ``(batch, num_kv_heads, max_len, head_dim)``."""
        return self._k

    @property
    def value_buffer(self) -> np.ndarray:
        """The whole preallocated value buffer ``(batch, num_kv_heads, max_len, value_dim)``."""
        return self._v

    @property
    def key_scale_buffer(self):
        """The keys' scales ``(batch, num_kv_heads, max_len)`` float32 of an int8 cache; None otherwise."""
        return self._k_scale

    @property
    def value_scale_buffer(self):
        """The values' scales ``(batch, num_kv_heads, max_len)`` float32 of an int8 cache; None otherwise."""
        return self._v_scale

    @property
    def key_scales(self):
        """A read-only view ``(batch, num_kv_heads, length)`` of the cached keys' scales (int8 cache); None otherwise."""
        return None if self._k_scale is None else self._prefix(self._k_scale)

    @property
    def value_scales(self):
        """A read-only view ``(batch, num_kv_heads, length)`` of the cached values' scales (int8 cache); None otherwise."""
        return None if self._v_scale is None else self._prefix(self._v_scale)

    @property
    def keys(self) -> np.ndarray:
        """Read-only view ``(batch, num_kv_heads, length, head_dim)`` of the cached keys (no copy; int8 codes for an
        int8 cache, see :attr:`key_scales`)."""
        return self._prefix(self._k)

    @property
    def values(self) -> np.ndarray:
        """Read-only view ``(batch, num_kv_heads, length, value_dim)`` of the cached values (no copy)."""
        return self._prefix(self._v)

    def _prefix(self, buffer):
        view = buffer[:, :, :self._length]
        # Read-only so that a stray write cannot corrupt the cache behind append()'s back.
        view.flags.writeable = False
        return view

    def reset(self) -> None:
        """Forget every cached token (the buffers are kept, not cleared: only the prefix is ever read)."""
        self._length = 0

    # -- operations ---------------------------------------------------------------------------

    def _check_new(self, x, name: str, width: int, width_name: str) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except Exception as exc:
                raise TypeError(f"{name} must be a {self.dtype} array; could not convert {type(x).__name__}: {exc}") from None
        if self.quantized:
            if not is_attention_dtype(x.dtype):
                raise TypeError(f"{name} must be a float32, float64, float16 or bfloat16 array (quantised to the "
                                f"int8 cache on append), got {x.dtype}")
        elif x.dtype != self.dtype:
            # No silent casts: a float64 step into a float32 cache is most likely a bug upstream.
            raise TypeError(f"{name} must have dtype {self.dtype} (the cache's dtype), got {x.dtype}")
        expected = f"(batch={self.batch}, num_kv_heads={self.num_kv_heads}, n, {width_name}={width})"
        if x.ndim != 4 or x.shape[0] != self.batch or x.shape[1] != self.num_kv_heads or x.shape[3] != width:
            raise ValueError(f"{name} must have shape {expected}, got {x.shape}")
        return x

    def append(self, k_new, v_new) -> None:
        """Write the keys and values of ``n`` new tokens after the cached ones, in place.

        Args:
            k_new: ``(batch, num_kv_heads, n, head_dim)`` in the cache's dtype (any float dtype for an int8
                cache, quantised per token and head by :func:`fusedattn.quantize_kv`); ``n >= 0``, any strides.
            v_new: ``(batch, num_kv_heads, n, value_dim)``, the same ``n``.

        Raises ``ValueError`` (nothing written) when the cache cannot hold ``n`` more tokens, or for
        wrong shapes; ``TypeError`` for another dtype.

        Example:
            >>> import numpy as np
            >>> from fusedattn.kv_cache import KVCache
            >>> cache = KVCache(2, 1, max_len=8, head_dim=4)
            >>> cache.append(np.ones((2, 1, 5, 4), np.float32), np.ones((2, 1, 5, 4), np.float32))
            >>> cache.length
            5
        """
        k_new = self._check_new(k_new, "k_new", self.head_dim, "head_dim")
        v_new = self._check_new(v_new, "v_new", self.value_dim, "value_dim")
        n = k_new.shape[2]
        if v_new.shape[2] != n:
            raise ValueError(f"k_new and v_new must hold the same number of tokens (axis 2), "
                             f"got k_new {k_new.shape} and v_new {v_new.shape}")
        if self._length + n > self.max_len:
            raise ValueError(f"KVCache is full: capacity max_len={self.max_len}, it holds {self._length} tokens and "
                             f"{n} more were requested ({self._length + n} > {self.max_len}); reset() it or allocate "
                             f"a larger max_len")
        new = slice(self._length, self._length + n)
        if self.quantized:
            # Both quantised before either is written: a NaN in v_new must not leave k_new half-appended.
            (k_codes, k_scale), (v_codes, v_scale) = quantize_kv(k_new), quantize_kv(v_new)
            self._k[:, :, new], self._k_scale[:, :, new] = k_codes, k_scale
            self._v[:, :, new], self._v_scale[:, :, new] = v_codes, v_scale
        else:
            self._k[:, :, new] = k_new
            self._v[:, :, new] = v_new
        self._length += n

    def attend(self, q, *, causal="bottom_right", mask=None, scale=None, precision="highest", sinks=None):
        """Attention of ``Lq`` new queries to every cached token: ``fusedattn.attention(q, keys, values)``.

        Append the new tokens' keys/values first: with the default ``causal="bottom_right"`` query
        ``i`` of ``Lq`` sees cached tokens ``j <= i + length - Lq``, i.e. itself and everything before it
        (one query sees the whole cache). ``causal=False`` sees every cached token (e.g. cross-attention
        to an encoder's cached keys/values).

        Args:
            q: ``(batch, Hq, Lq, head_dim)`` in the cache's dtype (for an int8 cache any of float32, float64,
                float16 and bfloat16: computed in float64 for float64 q, in float32 otherwise), ``Hq`` a multiple
                of ``num_kv_heads``.
            causal: ``"bottom_right"`` (default), ``False``, or ``True``/``"top_left"`` as in
                :func:`fusedattn.attention`.
            mask: optional bool (True = may attend) or float mask broadcastable to ``(batch, Hq, Lq, length)``.
            scale: default ``1 / sqrt(head_dim)``.
            precision: ``"highest"`` (default), ``"high"`` or ``"medium"``, as in :func:`fusedattn.attention`:
                float32 products on the AMX tiles for prefill-sized ``Lq`` (> 4) on the ``amx`` level; a
                decoding step (``Lq <= 4``) and every other level run the ``"highest"`` path.
            sinks: optional ``(Hq,)`` attention-sink logits (gpt-oss): each joins its head's softmax
                denominator with no value, as in :func:`fusedattn.attention`.

        Returns:
            ``(batch, Hq, Lq, value_dim)`` in the cache's dtype (float32 accumulation inside the kernel
            for a 16-bit cache; q's dtype for an int8 cache). A query that sees no cached token (an empty cache,
            say) gets 0.

        Example:
            >>> import numpy as np
            >>> from fusedattn.kv_cache import KVCache
            >>> cache = KVCache(1, 1, max_len=4, head_dim=2)
            >>> cache.append(np.ones((1, 1, 2, 2), np.float32), np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2))
            >>> cache.attend(np.ones((1, 1, 1, 2), np.float32))   # equal scores: the mean of the values
            array([[[[1., 2.]]]], dtype=float32)
        """
        if not isinstance(q, np.ndarray):
            q = np.asarray(q)
        if self.quantized:
            if not is_attention_dtype(q.dtype):
                raise TypeError(f"q must have dtype float32, float64, float16 or bfloat16 (ml_dtypes) with an int8 "
                                f"cache, got {q.dtype}")
        elif q.dtype != self.dtype:
            raise TypeError(f"q must have dtype {self.dtype} (the cache's dtype), got {q.dtype}")
        if q.ndim != 4 or q.shape[0] != self.batch or q.shape[3] != self.head_dim:
            raise ValueError(f"q must have shape (batch={self.batch}, Hq, Lq, head_dim={self.head_dim}), got {q.shape}")
        if q.shape[1] == 0 or q.shape[1] % self.num_kv_heads:
            raise ValueError(f"q's number of heads must be a positive multiple of the cache's num_kv_heads="
                             f"{self.num_kv_heads} (grouped-query attention), got Hq={q.shape[1]}")
        extra = {}  # only what is set: the call stays valid for an attention() without these arguments
        if sinks is not None:
            extra["sinks"] = sinks
        if self.quantized:
            extra.update(k_scale=self.key_scales, v_scale=self.value_scales)
        return fusedattn.attention(q, self.keys, self.values, mask=mask, causal=causal, scale=scale,
                                   precision=precision, **extra)

    def __repr__(self):
        value = f", value_dim={self.value_dim}" if self.value_dim != self.head_dim else ""
        return (f"KVCache(batch={self.batch}, num_kv_heads={self.num_kv_heads}, max_len={self.max_len}, "
                f"head_dim={self.head_dim}{value}, dtype={self.dtype.name}, length={self._length})")
