"""Structured masks: described by a few numbers, never materialised by the kernels.

``BlockDiagonal`` packs several sequences along the length axis of one batch entry (xformers'
``BlockDiagonalMask``): query block ``b`` attends only key block ``b``. Passed as ``mask=`` to
:func:`fusedattn.attention` / :func:`fusedattn.attention_backward`, it runs the packed
variable-length kernel (:func:`fusedattn.attention_varlen`) on the same arrays.
"""
from __future__ import annotations

import numbers

import numpy as np

__all__ = ["BlockDiagonal"]


def _check_seqlens(seqlens, name: str) -> np.ndarray:
    lengths = np.asarray(seqlens)
    if lengths.ndim != 1 or lengths.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of lengths, got shape {lengths.shape}")
    if lengths.dtype == np.bool_ or not np.issubdtype(lengths.dtype, np.integer):
        if not all(isinstance(x, numbers.Integral) for x in np.ravel(lengths).tolist()):
            raise TypeError(f"{name} must hold integers, got dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64)
    if (lengths < 0).any():
        raise ValueError(f"{name} must be >= 0, got {lengths.tolist()}")
    return lengths


class BlockDiagonal:
    """Several sequences packed along L: queries of sequence ``b`` see only keys of sequence ``b``.

    Args:
        q_seqlens: the query length of each sequence.
        kv_seqlens: the key length of each sequence (default: the same as ``q_seqlens``).

    Combine with ``causal=`` for causal attention within each sequence (the alignment applies per sequence).

    Example:
        >>> import numpy as np, fusedattn as fa
        >>> mask = fa.masks.BlockDiagonal.from_seqlens([3, 5])
        >>> q = k = v = np.random.rand(1, 2, 8, 4)             # (1, H, total, D): two sequences, 3 + 5
        >>> out = fa.attention(q, k, v, mask=mask)
        >>> bool(np.allclose(out, fa.attention(q, k, v, mask=mask.materialize())))
        True
    """

    def __init__(self, q_seqlens, kv_seqlens=None):
        self.q_seqlens = _check_seqlens(q_seqlens, "q_seqlens")
        self.kv_seqlens = self.q_seqlens.copy() if kv_seqlens is None else _check_seqlens(kv_seqlens, "kv_seqlens")
        if self.kv_seqlens.shape != self.q_seqlens.shape:
            raise ValueError(f"q_seqlens and kv_seqlens must list the same number of sequences, got "
                             f"{self.q_seqlens.size} and {self.kv_seqlens.size}")

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None) -> "BlockDiagonal":
        """The mask for sequences of these lengths (xformers' spelling)."""
        return cls(q_seqlen, kv_seqlen)

    @property
    def cu_seqlens_q(self) -> np.ndarray:
        """``(n + 1,)`` int64 offsets of the sequences' queries (0, then each one's end)."""
        return np.concatenate([[0], np.cumsum(self.q_seqlens)]).astype(np.int64)

    @property
    def cu_seqlens_k(self) -> np.ndarray:
        """``(n + 1,)`` int64 offsets of the sequences' keys (0, then each one's end)."""
        return np.concatenate([[0], np.cumsum(self.kv_seqlens)]).astype(np.int64)

    @property
    def total_q(self) -> int:
        """The packed query length, the sum of ``q_seqlens``."""
        return int(self.q_seqlens.sum())

    @property
    def total_k(self) -> int:
        """The packed key length, the sum of ``kv_seqlens``."""
        return int(self.kv_seqlens.sum())

    def materialize(self) -> np.ndarray:
        """The equivalent dense bool mask ``(total_q, total_k)`` (True = may attend): for tests and plots.

        Causal restrictions are not included (they follow the ``causal`` argument, per sequence).
        """
        q_ids = np.repeat(np.arange(self.q_seqlens.size), self.q_seqlens)
        k_ids = np.repeat(np.arange(self.kv_seqlens.size), self.kv_seqlens)
        return q_ids[:, None] == k_ids[None, :]

    def __repr__(self) -> str:
        return f"BlockDiagonal(q_seqlens={self.q_seqlens.tolist()}, kv_seqlens={self.kv_seqlens.tolist()})"
