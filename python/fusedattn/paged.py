"""Paged key/value caches (the vLLM layout): argument checks, a provisional ``attention_paged``, and
:class:`PagedKVCache`, a block pool for many sequences with copy-on-write prefix sharing.

Layout: the key cache is ``(num_blocks, block_size, Hkv, D)``, the value cache
``(num_blocks, block_size, Hkv, Dv)``; token ``t`` of sequence ``b`` lives at
``cache[block_table[b, t // block_size], t % block_size]``. int8 caches carry one float32 scale per
(token, kv head): ``k_scale`` / ``v_scale`` of shape ``(num_blocks, block_size, Hkv)``.
"""
from __future__ import annotations

import numbers

import numpy as np

import fusedattn  # fusedattn.attention / attention_paged are looked up at call time

from . import _backend
from ._checks import MAX_HEAD_DIM, check_positive_int as _check_positive_int, is_attention_dtype
from .quant import quantize_kv

__all__ = ["PagedKVCache", "attention_paged", "check_paged_args"]

_FLOAT_NAMES = "float32, float64, float16 or bfloat16 (ml_dtypes)"


def _as_array(x, name):
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:
            raise TypeError(f"{name} must be an array; could not convert {type(x).__name__}: {exc}") from None
    return x


_INT32 = np.dtype(np.int32)  # native int32: the one dtype instance such arrays share


def _index_array(x, name, ndim, shape_text):
    """``shape_text()`` names the expected shape; called on failure only (this runs on every decode step)."""
    x = _as_array(x, name)
    if x.dtype.kind not in "iu":  # signed or unsigned integers; dtype.kind is ~20x cheaper than np.issubdtype
        raise TypeError(f"{name} must be an integer array (int32 preferred), got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_text()}, got shape {x.shape}")
    return x


def check_paged_args(q, key_cache, value_cache, block_table, seq_lens, *, causal="bottom_right", sinks=None,
                     k_scale=None, v_scale=None, alibi_slopes=None, out=None):
    """Validate the arrays of an :func:`attention_paged` call; return the normalised index arrays.

    Everything that decides where the kernel reads is checked here, so that no call can read outside
    the pool: shapes and dtypes of q and the caches, the int8 scales, and every length and block id a
    sequence uses. Errors name the argument, what was expected and what was received.

    Args:
        q: ``(B, Hq, Lq, D)``; the caches' dtype (float caches), or any of float32, float64, float16 and
            bfloat16 with int8 caches (computed in float64 for float64 q, in float32 otherwise).
        key_cache: ``(num_blocks, block_size, Hkv, D)``, float32 / float64 / float16 / bfloat16 or int8.
        value_cache: ``(num_blocks, block_size, Hkv, Dv)``, the key cache's dtype.
        block_table: ``(B, max_blocks_per_seq)`` integers. Only the first ``ceil(seq_lens[b] / block_size)``
            entries of row ``b`` are read, and they must lie in ``[0, num_blocks)``; later entries are
            padding (vLLM fills them with anything) and are ignored.
        seq_lens: ``(B,)`` integers in ``[0, max_blocks_per_seq * block_size]``.
        causal: ``"bottom_right"`` (query ``i`` sits at position ``seq_lens[b] - Lq + i`` and sees the keys
            up to it) or ``False``.
        sinks: None or ``(Hq,)`` floats.
        k_scale, v_scale: ``(num_blocks, block_size, Hkv)`` float32, both given for int8 caches, neither
            for float caches.
        alibi_slopes: None, ``(Hq,)`` or ``(B, Hq)``.
        out: None or a ``(B, Hq, Lq, Dv)`` array of q's dtype.

    ``scale``, ``window`` and ``softcap`` are checked as in :func:`fusedattn.attention`, not here.

    Returns:
        ``(block_table, seq_lens)`` as C-contiguous int32 arrays (the inputs themselves when they already
        are).

    Raises:
        TypeError: a wrong dtype. ValueError: a wrong shape, length or block id.

    Example:
        >>> import numpy as np
        >>> from fusedattn.paged import check_paged_args
        >>> kc = vc = np.zeros((4, 16, 2, 8), np.float32)
        >>> q = np.zeros((1, 4, 1, 8), np.float32)
        >>> table, lens = check_paged_args(q, kc, vc, [[2, 0]], [20])
        >>> table.dtype, lens.tolist()
        (dtype('int32'), [20])
        >>> check_paged_args(q, kc, vc, [[2, 7]], [20])
        Traceback (most recent call last):
        ...
        ValueError: block_table[0, 1] = 7 is not a block of the pool: block ids must be in [0, num_blocks=4) for the first ceil(seq_lens[0] / block_size) = 2 entries of a row
    """
    if not (causal is False or (isinstance(causal, str) and causal == "bottom_right")):
        raise ValueError(f"causal must be 'bottom_right' or False for paged attention (query i of sequence b sits at "
                         f"position seq_lens[b] - Lq + i), got {causal!r}")
    q = _as_array(q, "q")
    key_cache = _as_array(key_cache, "key_cache")
    value_cache = _as_array(value_cache, "value_cache")

    # -- caches --------------------------------------------------------------------------------
    for name, x, last in (("key_cache", key_cache, "D"), ("value_cache", value_cache, "Dv")):
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape (num_blocks, block_size, Hkv, {last}), got shape {x.shape}")
        if not (x.dtype == np.int8 or is_attention_dtype(x.dtype)):
            raise TypeError(f"{name} must have dtype {_FLOAT_NAMES} or int8, got {x.dtype}")
    if key_cache.dtype != value_cache.dtype:
        raise TypeError(f"key_cache and value_cache must have the same dtype, got {key_cache.dtype} and {value_cache.dtype}")
    num_blocks, block_size, hkv, d = key_cache.shape
    dv = value_cache.shape[3]
    if value_cache.shape[:3] != key_cache.shape[:3]:
        raise ValueError(f"value_cache must have shape (num_blocks={num_blocks}, block_size={block_size}, Hkv={hkv}, Dv) "
                         f"like key_cache {key_cache.shape}, got {value_cache.shape}")
    if block_size < 1 or hkv < 1:
        raise ValueError(f"key_cache must have block_size >= 1 and Hkv >= 1, got shape {key_cache.shape}")
    for name, width in (("D", d), ("Dv", dv)):
        if not 1 <= width <= MAX_HEAD_DIM:
            raise ValueError(f"the caches' head dim {name} must be between 1 and {MAX_HEAD_DIM}, got {width}")

    quantized = key_cache.dtype == np.int8
    if (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale and v_scale must be given together (int8 caches) or not at all (float caches), got "
                         f"{'k_scale' if k_scale is not None else 'v_scale'} only")
    if quantized and k_scale is None:
        raise ValueError("int8 caches need their per-token scales: pass k_scale= and v_scale= of shape "
                         f"(num_blocks, block_size, Hkv) = {key_cache.shape[:3]} (float32)")
    if not quantized and k_scale is not None:
        raise ValueError(f"k_scale / v_scale are for int8 caches only, got {key_cache.dtype} caches")
    if quantized:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            s = _as_array(s, name)
            if s.dtype != np.float32:
                raise TypeError(f"{name} must have dtype float32, got {s.dtype}")
            if s.shape != key_cache.shape[:3]:
                raise ValueError(f"{name} must have shape (num_blocks, block_size, Hkv) = {key_cache.shape[:3]}, "
                                 f"got {s.shape}")

    # -- q -------------------------------------------------------------------------------------
    if quantized:
        if not is_attention_dtype(q.dtype):
            raise TypeError(f"q must have dtype {_FLOAT_NAMES} with int8 caches, got {q.dtype}")
    elif q.dtype != key_cache.dtype:
        raise TypeError(f"q must have the caches' dtype {key_cache.dtype}, got {q.dtype}")
    if q.ndim != 4:
        raise ValueError(f"q must have shape (B, Hq, Lq, D), got shape {q.shape}")
    b, hq, lq, qd = q.shape
    if qd != d:
        raise ValueError(f"q's head dim must be the key cache's D={d}, got q of shape {q.shape}")
    if hq == 0 or hq % hkv:
        raise ValueError(f"q's number of heads Hq must be a positive multiple of the caches' Hkv={hkv} "
                         f"(grouped-query attention), got Hq={hq}")
    if lq < 1:
        raise ValueError(f"q must have at least one query per sequence (Lq >= 1), got shape {q.shape}")
    if sinks is not None:
        s = _as_array(sinks, "sinks")
        if not (np.issubdtype(s.dtype, np.floating) or is_attention_dtype(s.dtype)):
            raise TypeError(f"sinks must be a float array, got dtype {s.dtype}")
        if s.shape != (hq,):
            raise ValueError(f"sinks must have shape (Hq,) = ({hq},), one logit per query head, got {s.shape}")
    if alibi_slopes is not None and np.shape(alibi_slopes) not in ((hq,), (b, hq)):
        raise ValueError(f"alibi_slopes must have shape (Hq,) = ({hq},) or (B, Hq) = ({b}, {hq}), got "
                         f"{np.shape(alibi_slopes)}")
    if out is not None:
        if not isinstance(out, np.ndarray) or out.shape != (b, hq, lq, dv) or out.dtype != q.dtype:
            raise ValueError(f"out must be a {q.dtype} array of shape (B, Hq, Lq, Dv) = {(b, hq, lq, dv)}, got "
                             f"{getattr(out, 'dtype', type(out).__name__)} {np.shape(out)}")
        if not out.flags.writeable:
            raise ValueError("out must be writeable")

    return _check_block_table(block_table, seq_lens, b, block_size, num_blocks)


def _check_block_table(block_table, seq_lens, b, block_size, num_blocks):
    """The index half of :func:`check_paged_args`, for ``b`` sequences of a pool of ``num_blocks`` blocks of
    ``block_size`` tokens: shapes, dtypes, lengths and every block id a sequence reads. Run on every call,
    the repeats of a kept validation included (a decode loop's table and lengths change each step)."""
    block_table = _index_array(block_table, "block_table", 2, lambda: f"(B={b}, max_blocks_per_seq)")
    seq_lens = _index_array(seq_lens, "seq_lens", 1, lambda: f"(B,) = ({b},)")
    if block_table.shape[0] != b:
        raise ValueError(f"block_table must have one row per sequence of q: shape (B={b}, max_blocks_per_seq), "
                         f"got {block_table.shape}")
    if seq_lens.shape[0] != b:
        raise ValueError(f"seq_lens must have shape (B,) = ({b},), got {seq_lens.shape}")
    # The common case (int32 arrays in place, as PagedKVCache and serving engines keep them) is checked in one
    # compiled pass; anything else, or a fault, takes the NumPy checks below, which also name the fault.
    core = _backend._core
    if (core is not None and block_table.dtype is _INT32 and seq_lens.dtype is _INT32 and block_table.flags.c_contiguous
            and seq_lens.flags.c_contiguous and core.paged_indices_valid(block_table, seq_lens, block_size, num_blocks)):
        return block_table, seq_lens
    max_blocks = block_table.shape[1]
    capacity = max_blocks * block_size
    if b and seq_lens.min() < 0:
        i = int(np.argmin(seq_lens))
        raise ValueError(f"seq_lens must be >= 0, got seq_lens[{i}] = {int(seq_lens[i])}")
    if b and seq_lens.max() > capacity:
        i = int(np.argmax(seq_lens))
        raise ValueError(f"seq_lens[{i}] = {int(seq_lens[i])} exceeds what block_table's row can hold: max_blocks_per_seq="
                         f"{max_blocks} x block_size={block_size} = {capacity} tokens")
    # Every entry a pool block id (padding included, as PagedKVCache and zero-padded tables have it): nothing
    # else to check. Otherwise only the entries a sequence reads must be, and padding may hold anything.
    whole_table_valid = block_table.size == 0 or (block_table.min() >= 0 and block_table.max() < num_blocks)
    if not whole_table_valid or block_table.dtype != np.int32:
        used = -(-seq_lens.astype(np.int64) // block_size)  # blocks each sequence reads
        in_use = np.arange(max_blocks)[None, :] < used[:, None]
        bad = in_use & ((block_table < 0) | (block_table >= num_blocks))
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"block_table[{row}, {col}] = {int(block_table[row, col])} is not a block of the pool: block "
                             f"ids must be in [0, num_blocks={num_blocks}) for the first ceil(seq_lens[{row}] / "
                             f"block_size) = {int(used[row])} entries of a row")
        # The used entries are now in int32 range; padding may not be, so it is zeroed rather than wrapped.
        if block_table.dtype != np.int32:
            block_table = np.where(in_use, block_table, 0).astype(np.int32)
    return np.ascontiguousarray(block_table), np.ascontiguousarray(seq_lens, dtype=np.int32)


def _gather(cache, blocks, n):
    """Tokens ``0..n-1`` of one sequence: ``(num_blocks, bs, Hkv, ...)`` -> ``(Hkv, n, ...)`` (a copy)."""
    tokens = cache[blocks].reshape((-1,) + cache.shape[2:])[:n]
    return np.moveaxis(tokens, 0, 1)


def attention_paged(q, key_cache, value_cache, block_table, seq_lens, *, causal="bottom_right", scale=None, window=None,
                    alibi_slopes=None, softcap=None, sinks=None, k_scale=None, v_scale=None, return_lse=False, out=None,
                    num_threads=None):
    """Attention of each sequence's queries to its keys/values in a paged (vLLM-layout) cache.

    The fused kernel reads each sequence's keys and values in place through the block table (no gather,
    no copy; int8 caches are dequantised inside the loop), with the decode layout for short queries.

    Args:
        q: ``(B, Hq, Lq, D)``; query ``i`` of sequence ``b`` sits at position ``seq_lens[b] - Lq + i``
            (decoding: ``Lq = 1``; chunked prefill: the chunk's tokens, appended first). With
            ``seq_lens[b] < Lq`` the first queries of that sequence sit before its start and see no key.
            The caches' dtype, or any float dtype for int8 caches (float64 computes in float64, the others
            in float32).
        key_cache: ``(num_blocks, block_size, Hkv, D)``; value_cache: ``(num_blocks, block_size, Hkv, Dv)``.
        block_table: ``(B, max_blocks_per_seq)`` int32: row ``b`` lists sequence ``b``'s blocks in order.
        seq_lens: ``(B,)`` int32, the tokens cached per sequence (0 allowed).
        causal: ``"bottom_right"`` (default: each query sees the keys up to its position) or False.
        scale, window, alibi_slopes, softcap: as in :func:`fusedattn.attention` (the diagonal is each
            query's position); ``alibi_slopes`` ``(Hq,)`` or ``(B, Hq)``.
        sinks: ``(Hq,)`` logits joining every row's softmax denominator, with no value.
        k_scale, v_scale: ``(num_blocks, block_size, Hkv)`` float32, for int8 caches (see
            :func:`fusedattn.quantize_kv`).
        return_lse: also return the ``(B, Hq, Lq)`` log-sum-exp (the sink included).
        out: optional ``(B, Hq, Lq, Dv)`` array of the output's dtype to write into.
        num_threads: as in :func:`fusedattn.attention`.

    Returns:
        ``(B, Hq, Lq, Dv)`` in q's dtype (and the lse). A query that sees no key gets 0 and lse ``-inf``
        (the sink with sinks).

    Example:
        >>> import numpy as np, fusedattn as fa
        >>> rng = np.random.default_rng(0)
        >>> kc, vc = (rng.standard_normal((6, 4, 2, 8), dtype=np.float32) for _ in "kv")
        >>> q = rng.standard_normal((2, 4, 1, 8), dtype=np.float32)
        >>> table = np.array([[5, 1, 0], [2, 0, 0]], np.int32)   # sequence 1 uses one block
        >>> fa.attention_paged(q, kc, vc, table, np.array([9, 3], np.int32)).shape
        (2, 4, 1, 8)
    """
    from ._dispatch import dispatch
    from ._spec import prepare_paged

    spec = prepare_paged(q, key_cache, value_cache, block_table, seq_lens, causal=causal, scale=scale, window=window,
                         alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, k_scale=k_scale, v_scale=v_scale,
                         return_lse=return_lse, out=out, num_threads=num_threads)
    return dispatch(spec).run(spec)


# ---------------------------------------------------------------------------------------------
# PagedKVCache
# ---------------------------------------------------------------------------------------------

class _Sequence:
    """A sequence's block ids in token order and its length. The ids live in an int32 buffer that grows by
    doubling, so that attend() copies each row of its block table in one slice (from a Python list,
    block_table() took ~600 us per decode step for 16 sequences of 4-16k tokens, AMD EPYC Zen 1)."""

    __slots__ = ("_ids", "_count", "length")

    def __init__(self, blocks=None, length=0):
        ids = np.asarray(blocks if blocks is not None else [], np.int32)
        self._ids = np.zeros(max(8, len(ids)), np.int32)
        self._ids[:len(ids)] = ids
        self._count = len(ids)
        self.length = length

    @property
    def blocks(self) -> np.ndarray:
        """The block ids, a writable view (int32)."""
        return self._ids[:self._count]

    def add_block(self, block):
        if self._count == len(self._ids):
            self._ids = np.concatenate([self._ids, np.zeros(len(self._ids), np.int32)])
        self._ids[self._count] = block
        self._count += 1


class PagedKVCache:
    """A pool of fixed-size K/V blocks shared by many sequences, each with its own length (vLLM's layout).

    Sequences are added with :meth:`add_sequence`, grow with :meth:`append` (each by its own number of
    tokens), are attended with :meth:`attend` (one :func:`fusedattn.attention_paged` call for a whole
    ragged batch) and released with :meth:`free`. :meth:`fork` shares a sequence's blocks with a new one
    (beam search, parallel sampling); a shared block is copied only when one of its owners first writes
    into it (copy-on-write), so a fork never changes its parent and a full shared prefix is stored once.

    Args:
        num_kv_heads: Hkv. Queries may have any multiple of it (grouped-query attention).
        head_dim: D, the key (and query) head dim, 1..512.
        value_dim: Dv (default ``head_dim``).
        block_size: tokens per block (default 16), >= 1.
        num_blocks: None (default): the pool starts empty and grows geometrically on demand; an int:
            a fixed pool of that many blocks, allocated once, and an :meth:`append` that needs more blocks
            than are free raises ``ValueError`` ("pool is full") without writing anything.
        dtype: the storage: float32 (default), float64, float16 or bfloat16 (``ml_dtypes``), or
            ``np.int8``: keys/values quantised on append by :func:`fusedattn.quantize_kv`, one float32
            scale per (token, kv head) (:attr:`key_scales`, :attr:`value_scales`), a quarter of float32's
            bytes plus 4 bytes per token and head for the scales.

    Pool arrays: :attr:`key_cache` ``(num_blocks, block_size, Hkv, D)``, :attr:`value_cache`
    ``(num_blocks, block_size, Hkv, Dv)``; int8 also :attr:`key_scales` / :attr:`value_scales`
    ``(num_blocks, block_size, Hkv)`` float32. Slots of free blocks and past a sequence's length are never read.

    Example:
        >>> import numpy as np
        >>> from fusedattn.paged import PagedKVCache
        >>> cache = PagedKVCache(2, 8, block_size=4)
        >>> rng = np.random.default_rng(0)
        >>> a, b = cache.add_sequence(), cache.add_sequence()
        >>> kv = lambda n: rng.standard_normal((2, n, 8), dtype=np.float32)   # (Hkv, n, D)
        >>> cache.append([a, b], [kv(6), kv(1)], [kv(6), kv(1)])             # ragged prompts: 6 and 1 tokens
        >>> c = cache.fork(a)                                                # shares a's blocks
        >>> cache.append([a, b, c], [kv(1)] * 3, [kv(1)] * 3)                # one decoding step for each
        >>> q = rng.standard_normal((3, 4, 1, 8), dtype=np.float32)          # 4 query heads, one query each
        >>> cache.attend(q, [a, b, c]).shape
        (3, 4, 1, 8)
        >>> [cache.seq_len(s) for s in (a, b, c)], cache.num_blocks_used
        ([7, 2, 7], 4)
        >>> cache.free(a); cache.num_blocks_used
        3
    """

    def __init__(self, num_kv_heads, head_dim, *, value_dim=None, block_size=16, num_blocks=None, dtype=np.float32):
        self.num_kv_heads = _check_positive_int(num_kv_heads, "num_kv_heads")
        self.head_dim = _check_positive_int(head_dim, "head_dim", upper=MAX_HEAD_DIM)
        self.value_dim = self.head_dim if value_dim is None else _check_positive_int(value_dim, "value_dim",
                                                                                        upper=MAX_HEAD_DIM)
        self.block_size = _check_positive_int(block_size, "block_size")
        self.growable = num_blocks is None
        capacity = 0 if num_blocks is None else _check_positive_int(num_blocks, "num_blocks")
        try:
            resolved = np.dtype(dtype)
        except TypeError:
            resolved = None
        if resolved is None or not (resolved == np.int8 or is_attention_dtype(resolved)):
            raise TypeError(f"dtype must be float32, float64, float16, bfloat16 (ml_dtypes) or int8, got {dtype!r}")
        self.dtype = resolved
        self.quantized = resolved == np.int8
        self._k = self._v = self._ks = self._vs = None
        self._refcount = np.zeros(0, np.int32)
        self._free = []  # a stack of free block ids; the lowest ids are handed out first
        self._seqs = {}
        self._next_id = 0
        self._resize(capacity)

    # -- pool ---------------------------------------------------------------------------------

    def _resize(self, capacity):
        old = 0 if self._k is None else self._k.shape[0]
        hkv, bs = self.num_kv_heads, self.block_size

        def grown(arr, tail, dtype):
            # np.zeros maps pages lazily: blocks cost memory only once written.
            new = np.zeros((capacity, bs, hkv) + tail, dtype)
            if arr is not None and old:
                new[:old] = arr
            return new

        self._k = grown(self._k, (self.head_dim,), self.dtype)
        self._v = grown(self._v, (self.value_dim,), self.dtype)
        if self.quantized:
            self._ks = grown(self._ks, (), np.float32)
            self._vs = grown(self._vs, (), np.float32)
        self._refcount = np.concatenate([self._refcount, np.zeros(capacity - old, np.int32)])
        self._free = list(range(capacity - 1, old - 1, -1)) + self._free

    def _reserve(self, needed):
        """Make ``needed`` blocks free, growing the pool (at least doubling it) or saying that it is full."""
        if needed <= len(self._free):
            return
        capacity = self._k.shape[0]
        if not self.growable:
            raise ValueError(f"PagedKVCache pool is full: this append needs {needed} new blocks of {self.block_size} "
                             f"tokens and {len(self._free)} of the num_blocks={capacity} are free; free() finished "
                             f"sequences, or construct the cache with a larger num_blocks (or num_blocks=None to "
                             f"grow on demand)")
        in_use = capacity - len(self._free)
        self._resize(max(in_use + needed, 2 * capacity, 4))

    def _take_block(self):
        block = self._free.pop()
        self._refcount[block] = 1
        return block

    def _release(self, block):
        self._refcount[block] -= 1
        if self._refcount[block] == 0:
            self._free.append(block)

    @property
    def key_cache(self) -> np.ndarray:
        """The key pool ``(num_blocks, block_size, Hkv, D)`` in the storage dtype (replaced when the pool grows)."""
        return self._k

    @property
    def value_cache(self) -> np.ndarray:
        """The value pool ``(num_blocks, block_size, Hkv, Dv)`` in the storage dtype."""
        return self._v

    @property
    def key_scales(self):
        """The keys' scales ``(num_blocks, block_size, Hkv)`` float32 of an int8 cache; None otherwise."""
        return self._ks

    @property
    def value_scales(self):
        """The values' scales ``(num_blocks, block_size, Hkv)`` float32 of an int8 cache; None otherwise."""
        return self._vs

    @property
    def num_blocks(self) -> int:
        """Blocks in the pool (used and free)."""
        return self._k.shape[0]

    @property
    def num_blocks_used(self) -> int:
        """Blocks held by at least one sequence (a block shared by forks counts once)."""
        return self.num_blocks - len(self._free)

    @property
    def num_free_blocks(self) -> int:
        """Blocks of the pool that no sequence holds (a growable pool adds more when an append needs them)."""
        return len(self._free)

    @property
    def block_bytes(self) -> int:
        """The size of one block in bytes (keys, values and, for int8, their scales)."""
        per_token = self.num_kv_heads * (self.head_dim + self.value_dim) * self.dtype.itemsize
        if self.quantized:
            per_token += self.num_kv_heads * 2 * 4
        return self.block_size * per_token

    @property
    def memory_bytes(self) -> int:
        """Bytes of the whole pool (every block, used or free)."""
        return self.num_blocks * self.block_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks in use."""
        return self.num_blocks_used * self.block_bytes

    # -- sequences ----------------------------------------------------------------------------

    def __len__(self) -> int:
        """The number of live sequences."""
        return len(self._seqs)

    def __contains__(self, seq_id) -> bool:
        """Whether ``seq_id`` is a live sequence."""
        return seq_id in self._seqs

    @property
    def seq_ids(self) -> list:
        """The live sequences' ids, oldest first."""
        return list(self._seqs)

    def _seq(self, seq_id, name="seq_id"):
        if isinstance(seq_id, (bool, np.bool_)) or not isinstance(seq_id, numbers.Integral):
            raise TypeError(f"{name} must be an int (from add_sequence() or fork()), got {type(seq_id).__name__}")
        try:
            return self._seqs[int(seq_id)]
        except KeyError:
            raise KeyError(f"{name}={seq_id} is not a live sequence of this cache (never added, or freed)") from None

    def seq_len(self, seq_id) -> int:
        """Tokens cached for ``seq_id``."""
        return self._seq(seq_id).length

    def add_sequence(self) -> int:
        """Start an empty sequence; return its id (ids are never reused)."""
        seq_id = self._next_id
        self._next_id += 1
        self._seqs[seq_id] = _Sequence()
        return seq_id

    def fork(self, seq_id) -> int:
        """A new sequence with ``seq_id``'s tokens, sharing its blocks (copy-on-write); return its id.

        Costs no copy: the blocks' reference counts go up. Whichever of the two first appends into a
        partially filled shared last block copies it first, so neither ever sees the other's new tokens.

        Example:
            >>> import numpy as np
            >>> from fusedattn.paged import PagedKVCache
            >>> cache = PagedKVCache(1, 4, block_size=2)
            >>> parent = cache.add_sequence()
            >>> cache.append(parent, np.ones((1, 3, 4), np.float32), np.ones((1, 3, 4), np.float32))
            >>> child = cache.fork(parent); cache.num_blocks_used       # 2 blocks, shared
            2
            >>> cache.append(child, np.zeros((1, 1, 4), np.float32), np.zeros((1, 1, 4), np.float32))
            >>> cache.num_blocks_used, cache.seq_len(parent), cache.seq_len(child)   # the half block was copied
            (3, 3, 4)
        """
        parent = self._seq(seq_id)
        child_id = self.add_sequence()
        self._seqs[child_id] = _Sequence(parent.blocks, parent.length)
        self._refcount[parent.blocks] += 1  # a sequence's blocks are distinct
        return child_id

    def free(self, seq_id) -> None:
        """Forget ``seq_id``; its blocks return to the pool once no other sequence shares them."""
        seq = self._seq(seq_id)
        for block in seq.blocks.tolist():
            self._release(block)
        del self._seqs[int(seq_id)]

    # -- append / attend ----------------------------------------------------------------------

    def _check_new(self, x, name, seq_id, width, width_name):
        x = _as_array(x, name)
        if self.quantized:
            if not is_attention_dtype(x.dtype):
                raise TypeError(f"{name} for sequence {seq_id} must be a {_FLOAT_NAMES} array (quantised to int8 on "
                                f"append), got dtype {x.dtype}")
        elif x.dtype != self.dtype:
            # No silent casts: a float64 step into a float32 cache is most likely a bug upstream.
            raise TypeError(f"{name} for sequence {seq_id} must have dtype {self.dtype} (the cache's dtype), got {x.dtype}")
        if x.ndim != 3 or x.shape[0] != self.num_kv_heads or x.shape[2] != width:
            raise ValueError(f"{name} for sequence {seq_id} must have shape (num_kv_heads={self.num_kv_heads}, n, "
                             f"{width_name}={width}), got {x.shape}")
        return x

    def append(self, seq_ids, k, v) -> None:
        """Write new tokens' keys and values at the end of each listed sequence (ragged: each its own ``n``).

        Args:
            seq_ids: a list of live sequence ids (no repeats), or one id.
            k: one ``(Hkv, n_i, D)`` array per id (a list, or a ``(len(seq_ids), Hkv, n, D)`` array when all
                ``n_i`` are equal); for one id, the ``(Hkv, n, D)`` array itself. ``n_i >= 0``.
            v: likewise, ``(Hkv, n_i, Dv)``, the same ``n_i``.
                Float caches take their own dtype only; int8 caches take any float dtype and quantise it.

        Everything is checked, and the blocks reserved (growing the pool, or ``ValueError`` when a fixed
        pool is full), before anything is written: a failed append changes nothing.

        Example:
            >>> import numpy as np
            >>> from fusedattn.paged import PagedKVCache
            >>> cache = PagedKVCache(2, 4, block_size=4, num_blocks=3)
            >>> s, t = cache.add_sequence(), cache.add_sequence()
            >>> cache.append([s, t], [np.ones((2, 5, 4), np.float32), np.ones((2, 2, 4), np.float32)],
            ...              [np.ones((2, 5, 4), np.float32), np.ones((2, 2, 4), np.float32)])
            >>> cache.seq_len(s), cache.seq_len(t), cache.num_free_blocks
            (5, 2, 0)
        """
        if isinstance(seq_ids, (numbers.Integral, np.integer)) and not isinstance(seq_ids, (bool, np.bool_)):
            seq_ids, k, v = [seq_ids], [k], [v]
        seq_ids = list(seq_ids)
        seqs = [self._seq(s, "seq_ids entry") for s in seq_ids]
        if len(set(int(s) for s in seq_ids)) != len(seq_ids):
            # Two appends to one sequence in one call would race for the same slots.
            raise ValueError(f"seq_ids must not repeat an id (append each sequence's tokens in one array), got {seq_ids}")
        for name, x in (("k", k), ("v", v)):
            if len(x) != len(seq_ids):
                raise ValueError(f"{name} must hold one array per sequence id ({len(seq_ids)}), got {len(x)}")
        ks = [self._check_new(x, "k", s, self.head_dim, "head_dim") for s, x in zip(seq_ids, k)]
        vs = [self._check_new(x, "v", s, self.value_dim, "value_dim") for s, x in zip(seq_ids, v)]
        for s, kk, vv in zip(seq_ids, ks, vs):
            if kk.shape[1] != vv.shape[1]:
                raise ValueError(f"k and v for sequence {s} must hold the same number of tokens (axis 1), got "
                                 f"{kk.shape} and {vv.shape}")
        counts = [x.shape[1] for x in ks]
        if self.quantized:  # before any block is taken: a NaN must not leave a half-done append
            ks = [quantize_kv(x) for x in ks]
            vs = [quantize_kv(x) for x in vs]

        bs = self.block_size
        needed = 0
        for seq, n in zip(seqs, counts):
            if n == 0:
                continue
            partial_shared = seq.length % bs and self._refcount[seq.blocks[-1]] > 1
            needed += -(-(seq.length + n) // bs) - len(seq.blocks) + (1 if partial_shared else 0)
        self._reserve(needed)

        for seq, kk, vv in zip(seqs, ks, vs):
            self._write(seq, kk, vv)

    def _write(self, seq, kk, vv):
        bs = self.block_size
        n = (kk[0] if self.quantized else kk).shape[1]
        if n == 0:
            return
        if seq.length % bs and self._refcount[seq.blocks[-1]] > 1:
            # Copy-on-write: the other owners keep the old block, with their own tokens after ours.
            old = seq.blocks[-1]
            new = self._take_block()
            for arr in (self._k, self._v, self._ks, self._vs):
                if arr is not None:
                    arr[new] = arr[old]
            self._release(old)
            seq.blocks[-1] = new
        while len(seq.blocks) * bs < seq.length + n:
            seq.add_block(self._take_block())
        # Token t goes to block t // bs, slot t % bs: write block by block, each a (slots, Hkv, ...) slice.
        t = seq.length
        while t < seq.length + n:
            block, slot = seq.blocks[t // bs], t % bs
            count = min(bs - slot, seq.length + n - t)
            src = slice(t - seq.length, t - seq.length + count)
            if self.quantized:
                (kq, ksc), (vq, vsc) = kk, vv
                self._k[block, slot:slot + count] = kq[:, src].swapaxes(0, 1)
                self._v[block, slot:slot + count] = vq[:, src].swapaxes(0, 1)
                self._ks[block, slot:slot + count] = ksc[:, src].T
                self._vs[block, slot:slot + count] = vsc[:, src].T
            else:
                self._k[block, slot:slot + count] = kk[:, src].swapaxes(0, 1)
                self._v[block, slot:slot + count] = vv[:, src].swapaxes(0, 1)
            t += count
        seq.length += n

    def block_table(self, seq_ids):
        """``(block_table, seq_lens)`` for ``seq_ids``: ``(B, max_blocks)`` int32 (rows padded with 0) and ``(B,)`` int32,
        ready for :func:`fusedattn.attention_paged` with :attr:`key_cache` / :attr:`value_cache`."""
        seqs = [self._seq(s, "seq_ids entry") for s in seq_ids]
        width = max([len(s.blocks) for s in seqs] + [1])
        table = np.zeros((len(seqs), width), np.int32)
        for row, seq in enumerate(seqs):
            table[row, :len(seq.blocks)] = seq.blocks
        return table, np.array([s.length for s in seqs], np.int32)

    def gather(self, seq_id):
        """``(k, v)``: copies ``(Hkv, n, D)`` and ``(Hkv, n, Dv)`` of one sequence's tokens, in the storage
        dtype, or dequantised to float32 for an int8 cache (for inspection and tests; :meth:`attend` never
        gathers)."""
        seq = self._seq(seq_id)
        blocks = np.asarray(seq.blocks, np.intp)
        k, v = _gather(self._k, blocks, seq.length), _gather(self._v, blocks, seq.length)
        if self.quantized:
            k = k.astype(np.float32) * _gather(self._ks, blocks, seq.length)[..., None]
            v = v.astype(np.float32) * _gather(self._vs, blocks, seq.length)[..., None]
        return np.ascontiguousarray(k), np.ascontiguousarray(v)

    def attend(self, q, seq_ids, **kwargs):
        """Attention of each sequence's new queries to its cached tokens: one :func:`fusedattn.attention_paged` call.

        Append the new tokens' keys/values first: with the default ``causal="bottom_right"`` query ``i`` of
        ``Lq`` sits at position ``seq_len - Lq + i`` and sees itself and everything before it.

        Args:
            q: ``(len(seq_ids), Hq, Lq, D)``, Hq a multiple of ``num_kv_heads``; the cache's dtype, or
                any float dtype (float32, float64, float16, bfloat16) for an int8 cache. One ``Lq`` for all:
                decoding steps (``Lq = 1``) or equal chunks.
            seq_ids: the sequences, in q's batch order.
            **kwargs: passed on to :func:`fusedattn.attention_paged`: ``causal``, ``scale``, ``window``,
                ``alibi_slopes``, ``softcap``, ``sinks`` (``(Hq,)``), ``return_lse``, ``out``, ``num_threads``.

        Returns:
            ``(len(seq_ids), Hq, Lq, Dv)`` in q's dtype (and the lse with ``return_lse=True``).
        """
        for name in ("k_scale", "v_scale"):
            if name in kwargs:
                raise TypeError(f"{name} is the cache's own: PagedKVCache.attend passes its scales itself")
        table, lens = self.block_table(list(seq_ids))
        if self.quantized:
            kwargs.update(k_scale=self._ks, v_scale=self._vs)
        return fusedattn.attention_paged(q, self._k, self._v, table, lens, **kwargs)

    def __repr__(self):
        value = f", value_dim={self.value_dim}" if self.value_dim != self.head_dim else ""
        return (f"PagedKVCache(num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}{value}, block_size="
                f"{self.block_size}, dtype={self.dtype.name}, sequences={len(self)}, blocks={self.num_blocks_used}/"
                f"{self.num_blocks})")
