"""Attention layers in NumPy around the fused kernels: multi-head (torch-compatible) and additive (Bahdanau).

The layers hold their parameters as NumPy arrays: projections are NumPy matmuls, the attention itself
is one fused call (:func:`fusedattn.attention` or :func:`fusedattn.additive_attention`), which reads the
projected heads as strided views, so splitting into heads never copies.

There is no autograd, but each layer has a hand-written ``backward(dout)`` for its last forward call:
the forward keeps what the backward needs (inputs, projections, the attention output and its
log-sum-exp), and the backward runs the fused backward kernel (:func:`fusedattn.attention_backward` /
:func:`fusedattn.additive_attention_backward`, which recompute the probabilities tile by tile from the
saved lse) between NumPy matmuls for the projections. It returns the inputs' gradients and fills
``layer.grads`` with the parameters' gradients, keyed like ``state_dict()``.

16-bit layers (``dtype=np.float16`` or ``ml_dtypes.bfloat16``): the parameters are stored, and every
input, output and gradient is returned, in the 16-bit dtype, and the fused attention runs on 16-bit
projections (float32 accumulation inside the kernel). The projections themselves are NumPy matmuls done in
float32 (16-bit operands widened, the result rounded to 16 bits once): NumPy has no BLAS kernel for
float16 (its matmul is a slow generic loop) and none at all for bfloat16, and a float32 product rounded
once is also more accurate than a 16-bit accumulation. Each call therefore makes float32 copies of the
weights it multiplies by (O(E^2), small next to the O(B * L * E^2) products).

Mask convention (the same as :func:`fusedattn.attention`): a ``bool`` mask is True where a query **may**
attend a key; a float mask is added to the scores (``-inf`` forbids). torch's ``nn.MultiheadAttention``
uses the opposite for bool masks (``attn_mask`` and ``key_padding_mask``: True = NOT allowed), so convert
with ``~``:

* torch ``attn_mask`` ``(Lq, Lk)`` bool  ->  ``mask=~attn_mask``
* torch ``key_padding_mask`` ``(B, Lk)`` bool (True = padding)  ->  ``mask=~key_padding_mask[:, None, None, :]``
  (shape ``(B, 1, 1, Lk)``: broadcast over heads and queries)
* torch float masks are added in both libraries: pass them unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

import fusedattn  # the fused entry points are looked up at call time (fusedattn.attention, ...)

from ._checks import (MAX_HEAD_DIM, _is_float, check_positive_int as _check_positive_int, check_precision,
                      check_storage_dtype as _check_dtype, compute_dtype)

__all__ = ["AdditiveAttention", "MultiHeadAttention"]


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by kv_cache.py)
# ---------------------------------------------------------------------------------------------

def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for the projections, in the compute dtype: float32 for 16-bit operands (see the module
    docstring), so the result is float32 for a 16-bit layer; float32 / float64 operands are multiplied as
    they are (no copy)."""
    dtype = compute_dtype(a.dtype)
    return a.astype(dtype, copy=False) @ b.astype(dtype, copy=False)


def _sum_rows(x: np.ndarray) -> np.ndarray:
    """Column sums of a 2-D array, accumulated in the compute dtype (a bias gradient)."""
    return x.sum(axis=0, dtype=compute_dtype(x.dtype))


def _check_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (bool, np.bool_, float)):  # default_rng would accept neither sensibly
        raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}")
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None, got {rng!r} ({exc})") from None


def _uniform(rng: np.random.Generator, bound: float, shape, dtype) -> np.ndarray:
    # Drawn in float64 and then cast, so float32 and float64 layers built from one seed hold the same values.
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def _xavier_uniform(rng, shape, dtype) -> np.ndarray:
    """torch.nn.init.xavier_uniform_ for a 2-D ``(fan_out, fan_in)`` matrix (gain 1)."""
    fan_out, fan_in = shape
    return _uniform(rng, math.sqrt(6.0 / (fan_in + fan_out)), shape, dtype)


def _as_input(x, name: str, dtype: np.dtype) -> np.ndarray:
    """A float array in the layer's dtype (a view when it already is one)."""
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} must be a floating-point array; could not convert {type(x).__name__}: {exc}") from None
    if not _is_float(x.dtype):
        raise TypeError(f"{name} must be a floating-point array (computed in the layer's {dtype}), got dtype {x.dtype}")
    # Any float input is computed in the layer's dtype, as a layer holds one set of weights.
    return x.astype(dtype, copy=False)


def _param_to_numpy(value, name: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor: no torch import needed
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            value = value.float()  # torch cannot export bfloat16 to NumPy; float32 holds it exactly
        value = value.numpy()
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise TypeError(f"state_dict[{name!r}] must be an array, could not convert {type(value).__name__}: {exc}") from None
    if arr.dtype == np.bool_ or not (_is_float(arr.dtype) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"state_dict[{name!r}] must hold real numbers, got dtype {arr.dtype}")
    return arr


def _load_params(owner: str, expected: dict, state_dict, dtype, hints=()) -> dict:
    """Validate ``state_dict`` against ``expected`` (name -> shape) strictly; return converted copies.

    Every problem is collected first, so one error lists all missing and unexpected keys and every
    shape mismatch; nothing is assigned unless all of it is right.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of parameter names to arrays, got {type(state_dict).__name__}")
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    converted, mismatched = {}, []
    for name, shape in expected.items():
        if name in state_dict:
            arr = _param_to_numpy(state_dict[name], name)
            if arr.shape != shape:
                mismatched.append(f"{name}: expected shape {shape}, got {arr.shape}")
            converted[name] = np.array(arr, dtype=dtype, copy=True)
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if mismatched:
            problems.append("shape mismatches: " + "; ".join(mismatched))
        message = f"{owner}.load_state_dict: " + "; ".join(problems)
        extra = [hint for condition, hint in hints if condition(missing, unexpected)]
        if extra:
            message += " (" + " ".join(extra) + ")"
        raise ValueError(message)
    return converted


# ---------------------------------------------------------------------------------------------
# Multi-head attention
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _MHACache:
    """What a MultiHeadAttention forward call keeps for its backward (references, no copies)."""

    inputs: tuple          # (query, key, value) as the call received them (after the dtype cast)
    key_given: bool        # False for mha(x): backward returns one dx
    seq_first: bool        # batched (L, B, E) layout
    batched: bool
    q: np.ndarray          # (B, H, Lq, hd) projected heads, strided views, as the kernel read them
    k: np.ndarray          # (B, Hkv, Lk, hd)
    v: np.ndarray          # (B, Hkv, Lk, hd)
    heads: np.ndarray      # the attention output's memory: (B, Lq, H, hd), or (Lq, B, H, hd) seq-first
    heads_view: np.ndarray  # ... viewed as (B, H, Lq, hd)
    concat: np.ndarray     # ... viewed as (B, Lq, E) / (Lq, B, E): the out projection's input
    lse: np.ndarray        # (B, H, Lq)
    mask: object
    causal: object
    out_shape: tuple       # the shape of the returned out (and of dout)


class MultiHeadAttention:
    """Multi-head attention with torch ``nn.MultiheadAttention``'s parameters, on the fused kernel.

    ``out = concat_h(attention(x_q W_q^h + b_q^h, x_k W_k^h + b_k^h, x_v W_v^h + b_v^h)) W_o^T + b_o``
    with ``head_dim = embed_dim // num_heads`` and scale ``1 / sqrt(head_dim)``.

    Args:
        embed_dim: E, the query's feature size and the output's; a multiple of ``num_heads``.
        num_heads: query heads H; ``head_dim = E // H`` must be between 1 and 512.
        num_kv_heads: key/value heads (default H). Fewer is grouped-query attention: the k and v
            projections produce ``num_kv_heads * head_dim`` features and query head ``h`` reads kv head
            ``h // (H // num_kv_heads)``. Must divide H. (No torch equivalent when < H.)
        kdim, vdim: feature sizes of key and value inputs (default E). When either differs from E,
            the q/k/v projections are stored separately (``q_proj_weight``, ...) as torch does.
        bias: whether the input and output projections have biases.
        batch_first: inputs and output are ``(B, L, E)`` when True, ``(L, B, E)`` when False (as torch).
            Unbatched ``(L, E)`` inputs are accepted either way.
        dtype: float32 or float64: the parameters' dtype and the dtype every call computes in; or
            float16 / ``ml_dtypes.bfloat16``: parameters, inputs, outputs and gradients in 16 bits,
            projections computed in float32 and rounded once (see the module docstring).
        rng: ``numpy.random.Generator``, an int seed or None, for the initialisation.
        precision: ``"highest"`` (default), ``"high"`` or ``"medium"``: the fused attention's float32
            products, as in :func:`fusedattn.attention` (bf16x3 / bf16 on the AMX tiles on the ``amx``
            level, ignored elsewhere). Stored as :attr:`precision`; a call's ``precision=`` overrides it.
            The projections (NumPy matmuls), ``need_weights`` and :meth:`backward` (the fused backward, from
            the forward's saved output and lse) are not affected.
        sinks: learned attention sinks (gpt-oss): False/None (default, none), True (one logit per head,
            initialised to 0) or an initial ``(num_heads,)`` array. Head ``h``'s sink joins every row's
            softmax denominator with no value (``out_i = sum_j e^{s_ij} v_j / (e^{sink_h} + sum_j e^{s_ij})``),
            so a head can attend to "nothing". A parameter like the others: the ``sinks`` key of
            :meth:`state_dict` and :attr:`grads` (no torch ``nn.MultiheadAttention`` equivalent).

    Initialisation follows torch: xavier-uniform in-projection weights (over the stacked
    ``in_proj_weight``, or each separate projection), zero biases, and the out projection's
    ``nn.Linear`` default, uniform in ``+-1/sqrt(E)``.

    Parameters (NumPy arrays, torch's names and ``(out_features, in_features)`` layout; see
    :meth:`state_dict`): ``in_proj_weight`` ``(E + 2 * Ekv, E)`` where ``Ekv = num_kv_heads * head_dim``
    (rows: q, then k, then v) or, when kdim/vdim differ from E, ``q_proj_weight`` ``(E, E)``,
    ``k_proj_weight`` ``(Ekv, kdim)``, ``v_proj_weight`` ``(Ekv, vdim)``; ``in_proj_bias``
    ``(E + 2 * Ekv,)``; ``out_proj_weight`` ``(E, E)`` and ``out_proj_bias`` ``(E,)`` (the state-dict
    keys ``out_proj.weight`` / ``out_proj.bias``); with sinks, ``sinks`` ``(num_heads,)``.

    Training: :meth:`backward` ``(dout)`` differentiates the last call. It returns the gradient with
    respect to that call's inputs (``dx`` for ``mha(x)``; ``(dquery, dkey, dvalue)`` when key was
    passed) and sets :attr:`grads` to the parameters' gradients, a dict with :meth:`state_dict`'s keys
    and shapes. Each call keeps references to its inputs and activations for that (about
    ``B * (Lq * 2E + Lk * 2Ekv)`` numbers) until the next call or :meth:`load_state_dict`.

    Example:
        >>> import numpy as np
        >>> from fusedattn.layers import MultiHeadAttention
        >>> mha = MultiHeadAttention(64, 8, num_kv_heads=2, rng=0)
        >>> x = np.random.default_rng(1).standard_normal((2, 10, 64)).astype(np.float32)
        >>> out, weights = mha(x, causal=True, need_weights=True)
        >>> out.shape, out.dtype, weights.shape
        ((2, 10, 64), dtype('float32'), (2, 10, 10))
        >>> dx = mha.backward(np.ones_like(out))       # d(out.sum()) / dx
        >>> dx.shape, mha.grads["in_proj_weight"].shape
        ((2, 10, 64), (96, 64))
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None, bias=True,
                 batch_first=True, dtype=np.float32, rng=None, precision="highest", sinks=None):
        self.embed_dim = _check_positive_int(embed_dim, "embed_dim")
        self.num_heads = _check_positive_int(num_heads, "num_heads")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} and num_heads={num_heads}")
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head_dim = embed_dim // num_heads must be at most {MAX_HEAD_DIM} (the kernel's limit), "
                             f"got {embed_dim} // {num_heads} = {self.head_dim}")
        self.num_kv_heads = self.num_heads if num_kv_heads is None else _check_positive_int(num_kv_heads, "num_kv_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads (grouped-query attention), "
                             f"got num_heads={num_heads} and num_kv_heads={num_kv_heads}")
        self.kdim = self.embed_dim if kdim is None else _check_positive_int(kdim, "kdim")
        self.vdim = self.embed_dim if vdim is None else _check_positive_int(vdim, "vdim")
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        if not isinstance(batch_first, (bool, np.bool_)):
            raise TypeError(f"batch_first must be a bool, got {type(batch_first).__name__}")
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dtype = _check_dtype(dtype)
        check_precision(precision)
        #: The fused attention's float32 precision for calls that do not pass ``precision=``.
        self.precision = str(precision)
        # torch's flag: one stacked in_proj_weight only when k and v inputs have the query's width.
        self._qkv_same_embed_dim = self.kdim == self.embed_dim and self.vdim == self.embed_dim
        self.kv_embed_dim = self.num_kv_heads * self.head_dim
        initial_sinks = self._check_sinks(sinks)
        self.has_sinks = initial_sinks is not None
        self._params = self._init_params(_check_rng(rng))  # sinks start at 0: no random draw, same weights
        if initial_sinks is not None:
            self._params["sinks"] = initial_sinks
        self._cache = None  # what the last forward call left for backward()
        #: The parameters' gradients from the last :meth:`backward` (``state_dict()``'s keys and shapes,
        #: the layer's dtype); None before the first. Replaced, not accumulated, by each backward.
        self.grads = None

    # -- parameters ---------------------------------------------------------------------------

    def _check_sinks(self, sinks):
        """The constructor's ``sinks=``: None (no sinks) or the initial ``(num_heads,)`` values in the layer's dtype."""
        if sinks is None or sinks is False:
            return None
        if sinks is True:
            return np.zeros(self.num_heads, self.dtype)
        arr = _param_to_numpy(sinks, "sinks") if not isinstance(sinks, np.ndarray) else sinks
        if not (_is_float(arr.dtype) or np.issubdtype(arr.dtype, np.integer)) or arr.dtype == np.bool_:
            raise TypeError(f"sinks must be True, False/None or a ({self.num_heads},) float array, got dtype {arr.dtype}")
        if arr.shape != (self.num_heads,):
            raise ValueError(f"sinks must have shape (num_heads,) = ({self.num_heads},), one logit per head, got {arr.shape}")
        arr = np.array(arr, dtype=self.dtype, copy=True)
        if not np.all(np.isfinite(arr.astype(np.float64))):
            raise ValueError("sinks must be finite")
        return arr

    def _sinks_arg(self) -> dict:
        """``{"sinks": ...}`` for the fused calls (in the compute dtype, as the kernel reads it), or ``{}``."""
        if not self.has_sinks:
            return {}
        return {"sinks": self._params["sinks"].astype(compute_dtype(self.dtype), copy=False)}

    def _shapes(self) -> dict:
        """The state-dict keys and shapes, in torch's order."""
        e, ekv = self.embed_dim, self.kv_embed_dim
        shapes = {}
        if self._qkv_same_embed_dim:
            shapes["in_proj_weight"] = (e + 2 * ekv, e)
        else:
            shapes["q_proj_weight"] = (e, e)
            shapes["k_proj_weight"] = (ekv, self.kdim)
            shapes["v_proj_weight"] = (ekv, self.vdim)
        if self.bias:
            shapes["in_proj_bias"] = (e + 2 * ekv,)
        shapes["out_proj.weight"] = (e, e)
        if self.bias:
            shapes["out_proj.bias"] = (e,)
        if getattr(self, "has_sinks", False):
            shapes["sinks"] = (self.num_heads,)
        return shapes

    def _init_params(self, rng) -> dict:
        params = {}
        for name, shape in self._shapes().items():
            if name.endswith("proj_weight"):
                params[name] = _xavier_uniform(rng, shape, self.dtype)
            elif name == "out_proj.weight":
                # nn.Linear's default: kaiming_uniform(a=sqrt(5)), i.e. uniform in +-1/sqrt(fan_in).
                params[name] = _uniform(rng, 1.0 / math.sqrt(shape[1]), shape, self.dtype)
            else:
                params[name] = np.zeros(shape, self.dtype)  # torch zeroes both biases after init
        return params

    in_proj_weight = property(lambda self: self._params.get("in_proj_weight"),
                              doc="``(E + 2*Ekv, E)`` stacked q/k/v projection, or None when kdim/vdim differ from E.")
    q_proj_weight = property(lambda self: self._params.get("q_proj_weight"), doc="``(E, E)`` or None.")
    k_proj_weight = property(lambda self: self._params.get("k_proj_weight"), doc="``(Ekv, kdim)`` or None.")
    v_proj_weight = property(lambda self: self._params.get("v_proj_weight"), doc="``(Ekv, vdim)`` or None.")
    in_proj_bias = property(lambda self: self._params.get("in_proj_bias"), doc="``(E + 2*Ekv,)`` or None without bias.")
    out_proj_weight = property(lambda self: self._params["out_proj.weight"], doc="``(E, E)``.")
    out_proj_bias = property(lambda self: self._params.get("out_proj.bias"), doc="``(E,)`` or None without bias.")
    sinks = property(lambda self: self._params.get("sinks"), doc="``(num_heads,)`` sink logits, or None without sinks.")

    def state_dict(self) -> dict:
        """The parameters under torch ``nn.MultiheadAttention.state_dict()``'s names, shapes and order.

        Returns a new dict of copies (float arrays in the layer's dtype): ``in_proj_weight``
        ``(E + 2*Ekv, E)`` or ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``;
        ``in_proj_bias``; ``out_proj.weight`` ``(E, E)``; ``out_proj.bias`` (biases only with ``bias=True``).
        ``{k: torch.from_numpy(v) for k, v in mha.state_dict().items()}`` loads into a torch module.

        Example:
            >>> from fusedattn.layers import MultiHeadAttention
            >>> {k: v.shape for k, v in MultiHeadAttention(8, 2, rng=0).state_dict().items()}
            {'in_proj_weight': (24, 8), 'in_proj_bias': (24,), 'out_proj.weight': (8, 8), 'out_proj.bias': (8,)}
        """
        return {name: value.copy() for name, value in self._params.items()}

    def load_state_dict(self, state_dict) -> None:
        """Load parameters from a dict with :meth:`state_dict`'s keys and shapes (strict).

        ``state_dict`` maps names to arrays, or to torch tensors (``torch_mha.state_dict()`` loads
        directly). Values are copied and cast to the layer's dtype. Raises ``ValueError`` listing every
        missing key, unexpected key and shape mismatch (nothing is loaded then), ``TypeError`` for a
        non-mapping or non-numeric values.

        Example:
            >>> from fusedattn.layers import MultiHeadAttention
            >>> a, b = MultiHeadAttention(8, 2, rng=0), MultiHeadAttention(8, 2, rng=1)
            >>> b.load_state_dict(a.state_dict())
            >>> bool((a.in_proj_weight == b.in_proj_weight).all())
            True
        """
        hints = (
            (lambda missing, unexpected: "q_proj_weight" in unexpected and "in_proj_weight" in missing,
             "q/k/v_proj_weight is torch's form for kdim/vdim different from embed_dim: pass kdim= and vdim=."),
            (lambda missing, unexpected: "in_proj_weight" in unexpected and "q_proj_weight" in missing,
             "in_proj_weight is torch's form for kdim == vdim == embed_dim: leave kdim and vdim at None."),
            (lambda missing, unexpected: "in_proj_bias" in unexpected,
             "the dict has biases: construct the layer with bias=True."),
            (lambda missing, unexpected: "in_proj_bias" in missing,
             "the dict has no biases: construct the layer with bias=False."),
            (lambda missing, unexpected: "sinks" in unexpected,
             "the dict has attention sinks: construct the layer with sinks=True."),
            (lambda missing, unexpected: "sinks" in missing,
             "the dict has no attention sinks: construct the layer without sinks=."),
        )
        self._params = _load_params(type(self).__name__, self._shapes(), state_dict, self.dtype, hints)
        # The cached activations were computed with the old parameters: a backward through them would
        # mix old activations with new weights, so it must be preceded by a new forward call.
        self._cache = None

    # -- forward ------------------------------------------------------------------------------

    def __call__(self, query, key=None, value=None, *, mask=None, causal=False, need_weights=False, precision=None):
        """Attend ``query`` to ``key``/``value`` (self-attention when both are omitted).

        Args:
            query: ``(B, Lq, E)`` if ``batch_first`` else ``(Lq, B, E)``; or unbatched ``(Lq, E)``.
            key: ``(B, Lk, kdim)`` / ``(Lk, B, kdim)`` / ``(Lk, kdim)``; default ``query``.
            value: ``(B, Lk, vdim)`` likewise; default ``key``. Lk may differ from Lq (cross-attention).
                Float inputs of another dtype are cast to the layer's dtype; others are a ``TypeError``.
            mask: optional, broadcastable to ``(B, num_heads, Lq, Lk)`` (``(num_heads, Lq, Lk)``
                unbatched), whatever ``batch_first``. ``bool``: True = may attend, **the opposite of
                torch's bool** ``attn_mask`` / ``key_padding_mask`` (pass ``~attn_mask``, or
                ``~key_padding_mask[:, None, None, :]``); float: added to the scaled scores.
            causal: as :func:`fusedattn.attention`: ``True``/``"top_left"`` is torch's ``is_causal``
                (query i sees keys ``j <= i``); ``"bottom_right"`` aligns the last query with the last key.
            need_weights: also return the attention probabilities averaged over heads (torch's
                ``average_attn_weights=True``). Off by default, unlike torch: they cost a second pass.
            precision: this call's ``"highest"``, ``"high"`` or ``"medium"`` (see the class docstring);
                None (default) uses the layer's :attr:`precision`.

        Returns:
            ``(out, weights)``: ``out`` shaped like ``query`` with ``E`` features, in the layer's dtype;
            ``weights`` None, or ``(B, Lq, Lk)`` (``(Lq, Lk)`` unbatched). A query that may attend no
            key gets weights 0 and ``out`` equal to the output bias (torch gives NaN there).

        The call is remembered for :meth:`backward` (only ``out`` is differentiated; ``weights`` are
        for inspection).
        """
        self._cache = None  # a failed call must not leave an older call's activations for backward()
        if key is None and value is not None:
            raise ValueError("value was given without key: pass key too (or neither, for self-attention)")
        precision = self.precision if precision is None else precision
        check_precision(precision)  # before the projections, which a bad value would waste
        # mha(x) and mha(x, x, x) alike take the one-matmul self-attention path.
        self_attention = key is None or (key is query and (value is None or value is query))
        q_in = _as_input(query, "query", self.dtype)
        k_in = q_in if self_attention else _as_input(key, "key", self.dtype)
        v_in = k_in if value is None else _as_input(value, "value", self.dtype)

        if q_in.ndim not in (2, 3):
            layout = "(B, L, E)" if self.batch_first else "(L, B, E)"
            raise ValueError(f"query must have shape {layout} or unbatched (L, E), got shape {q_in.shape}")
        for name, x in (("key", k_in), ("value", v_in)):
            if x.ndim != q_in.ndim:
                raise ValueError(f"{name} must have the same number of dimensions as query "
                                 f"({'batched' if q_in.ndim == 3 else 'unbatched'}), got query {q_in.shape} and {name} {x.shape}")
        for name, x, width, arg in (("query", q_in, self.embed_dim, "embed_dim"), ("key", k_in, self.kdim, "kdim"),
                                    ("value", v_in, self.vdim, "vdim")):
            if x.shape[-1] != width:
                raise ValueError(f"{name} must have {width} features ({arg}) in its last axis, got shape {x.shape}")

        batched = q_in.ndim == 3
        inputs = (q_in, k_in, v_in)  # in the caller's layout, for backward()
        # Work in (B, L, features): a view of (L, B, features) or of an unbatched (L, features) input.
        if not batched:
            q_in, k_in, v_in = q_in[None], k_in[None], v_in[None]
        elif not self.batch_first:
            q_in, k_in, v_in = (x.swapaxes(0, 1) for x in (q_in, k_in, v_in))
        if k_in.shape[1] != v_in.shape[1] or k_in.shape[0] != v_in.shape[0]:
            raise ValueError(f"key and value must have the same batch size and length, got key {np.shape(key)} "
                             f"and value {np.shape(value)}")
        if q_in.shape[0] != k_in.shape[0]:
            raise ValueError(f"query and key must have the same batch size, got query {np.shape(query)} and key {np.shape(key)}")

        q, k, v = self._project(q_in, k_in, v_in, self_attention)
        b, lq = q_in.shape[:2]
        # The heads' outputs go straight into (B, Lq, H, hd) memory, or (Lq, B, H, hd) for seq-first
        # output, through a transposed `out=` view: concatenating the heads is then a free reshape.
        seq_first = batched and not self.batch_first
        heads = np.empty((lq, b, self.num_heads, self.head_dim) if seq_first else (b, lq, self.num_heads, self.head_dim),
                         dtype=self.dtype)
        heads_view = heads.transpose(1, 2, 0, 3) if seq_first else heads.transpose(0, 2, 1, 3)
        # The lse (B, H, Lq) is all the fused backward needs to recompute the probabilities: one number
        # per query row, so keeping it for backward() costs next to nothing.
        _, lse = fusedattn.attention(q, k, v, mask=mask, causal=causal, out=heads_view, return_lse=True,
                                     precision=precision, **self._sinks_arg())
        concat = heads.reshape(heads.shape[:2] + (self.embed_dim,))
        out = _mm(concat, self._params["out_proj.weight"].T)
        if self.bias:
            out += self._params["out_proj.bias"].astype(out.dtype, copy=False)
        out = out.astype(self.dtype, copy=False)  # 16-bit layers: the float32 product rounded once

        weights = None
        if need_weights:
            probs = fusedattn.attention_weights(q, k, mask=mask, causal=causal)  # (B, H, Lq, Lk)
            if self.has_sinks:
                # The sink takes exp(sink - lse) of each row (lse includes it); the keys share the rest.
                sink = self._params["sinks"].astype(np.float64)[:, None]
                probs = probs * (1.0 - np.exp(sink - lse.astype(np.float64)))[..., None].astype(probs.dtype)
            weights = probs.mean(axis=1, dtype=compute_dtype(self.dtype)).astype(self.dtype, copy=False)
        if not batched:
            out = out[0]
            weights = None if weights is None else weights[0]
        self._cache = _MHACache(inputs=inputs, key_given=key is not None, seq_first=seq_first, batched=batched,
                                q=q, k=k, v=v, heads=heads, heads_view=heads_view, concat=concat, lse=lse,
                                mask=mask, causal=causal, out_shape=out.shape)
        return out, weights

    def backward(self, dout):
        """Gradients of the last call, given ``dout``, the gradient of the loss with respect to its ``out``.

        Runs the fused backward kernel (:func:`fusedattn.attention_backward`; with grouped-query
        attention ``dk``/``dv`` come back per kv head) between NumPy matmuls for the projections,
        from what the forward call kept: no part of the forward is recomputed. Honours that call's
        ``batch_first`` layout, unbatched inputs, ``mask`` and ``causal``. A float mask is a constant
        (no gradient); ``need_weights`` has no effect on the gradients (only ``out`` is differentiated).

        Args:
            dout: the shape of the call's ``out`` (``(B, Lq, E)``, ``(Lq, B, E)`` or ``(Lq, E)``); a float
                array, computed in the layer's dtype.

        Returns:
            For a self-attention call ``mha(x)`` (key omitted): ``dx``, shaped like ``x``, the sum of the
            query, key and value paths. Otherwise ``(dquery, dkey, dvalue)`` shaped like the call's
            query, key and value, each the gradient through that argument alone: when one array was
            passed in several places (``mha(x, kv)`` uses ``kv`` as key and value, ``mha(x, x, x)``), its
            total gradient is the sum of those entries (``dkey + dvalue``, ...). All in the layer's dtype.

        Also sets :attr:`grads` to a new dict of the parameters' gradients, with :meth:`state_dict`'s
        keys and shapes (the stacked ``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``,
        ``out_proj.weight``, ``out_proj.bias``). It may be called again (another ``dout``) for the same
        forward call.

        Raises:
            RuntimeError: no forward call to differentiate (none yet, the last one failed, or
                :meth:`load_state_dict` came after it).
            ValueError / TypeError: ``dout`` of the wrong shape / a non-float ``dout``.

        Example:
            >>> import numpy as np
            >>> from fusedattn.layers import MultiHeadAttention
            >>> mha = MultiHeadAttention(16, 4, batch_first=False, dtype=np.float64, rng=0)
            >>> query, memory = np.ones((5, 2, 16)), np.ones((7, 2, 16))   # (L, B, E)
            >>> out, _ = mha(query, memory)                                 # memory is key and value
            >>> dquery, dkey, dvalue = mha.backward(2 * out)                # loss = (out ** 2).sum()
            >>> dquery.shape, (dkey + dvalue).shape, mha.grads["out_proj.weight"].shape
            ((5, 2, 16), (7, 2, 16), (16, 16))
        """
        c = self._cache
        if c is None:
            raise RuntimeError("MultiHeadAttention.backward() needs a forward call first: call the layer (mha(x) or "
                               "mha(query, key, value)), then backward(dout) with the gradient of its output "
                               "(load_state_dict() discards the last call)")
        dout = _as_input(dout, "dout", self.dtype)
        if dout.shape != c.out_shape:
            raise ValueError(f"dout must have the shape of the forward call's output {c.out_shape}, got {dout.shape}")
        e = self.embed_dim
        w_out = self._params["out_proj.weight"]
        grads = {}
        # out = concat @ W_o^T + b_o, over all (batch, position) rows of the caller's layout.
        dout_rows = dout.reshape(-1, e)
        grads["out_proj.weight"] = _mm(dout_rows.T, c.concat.reshape(-1, e))
        if self.bias:
            grads["out_proj.bias"] = _sum_rows(dout_rows)
        # dconcat has the memory layout of `heads`, so the kernel reads its heads through the same view
        # (in the layer's dtype: the fused backward takes dout in the dtype of q).
        dheads = _mm(dout, w_out).astype(self.dtype, copy=False).reshape(c.heads.shape)
        dheads_view = dheads.transpose(1, 2, 0, 3) if c.seq_first else dheads.transpose(0, 2, 1, 3)
        sinks = self._sinks_arg()
        grads_attn = fusedattn.attention_backward(dheads_view, c.q, c.k, c.v, c.heads_view, c.lse,
                                                  mask=c.mask, causal=c.causal, **sinks)
        dq, dk, dv = grads_attn[:3]
        if sinks:
            grads["sinks"] = grads_attn[3]
        # (B, heads, L, hd) -> the caller's layout with heads * hd features (one copy each).
        dq, dk, dv = (self._heads_to_caller(g, c) for g in (dq, dk, dv))

        w_q, w_k, w_v = self._in_proj_weights()
        x_q, x_k, x_v = c.inputs
        # Each projection y = x @ W^T + b gives dW = dy^T x and dx = dy @ W.
        d_weights = [_mm(dy.reshape(-1, dy.shape[-1]).T, x.reshape(-1, x.shape[-1]))
                     for dy, x in ((dq, x_q), (dk, x_k), (dv, x_v))]
        if self._qkv_same_embed_dim:
            grads["in_proj_weight"] = np.concatenate(d_weights, axis=0)
        else:
            grads["q_proj_weight"], grads["k_proj_weight"], grads["v_proj_weight"] = d_weights
        if self.bias:
            grads["in_proj_bias"] = np.concatenate([_sum_rows(dy.reshape(-1, dy.shape[-1])) for dy in (dq, dk, dv)])
        # state_dict()'s order, in the layer's dtype (16-bit layers: float32 results rounded once).
        self.grads = {name: grads[name].astype(self.dtype, copy=False) for name in self._shapes()}
        dx_q, dx_k, dx_v = _mm(dq, w_q), _mm(dk, w_k), _mm(dv, w_v)
        if not c.key_given:
            return (dx_q + dx_k + dx_v).astype(self.dtype, copy=False)
        return tuple(dx.astype(self.dtype, copy=False) for dx in (dx_q, dx_k, dx_v))

    @staticmethod
    def _heads_to_caller(g, c):
        """``(B, heads, L, hd)`` -> ``(B, L, F)`` / ``(L, B, F)`` / ``(L, F)`` as the call's inputs, contiguous."""
        g = g.transpose(2, 0, 1, 3) if c.seq_first else g.transpose(0, 2, 1, 3)
        g = g.reshape(g.shape[:2] + (-1,))  # merging the (heads, hd) axes of a transposed array copies once
        return g if c.batched else g[0]

    def _in_proj_weights(self):
        """``(W_q, W_k, W_v)``: views of the stacked in_proj_weight, or the separate matrices."""
        if self._qkv_same_embed_dim:
            e, ekv = self.embed_dim, self.kv_embed_dim
            w = self._params["in_proj_weight"]
            return w[:e], w[e:e + ekv], w[e + ekv:]
        return tuple(self._params[n] for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))

    def _project(self, q_in, k_in, v_in, self_attention):
        """q ``(B, H, Lq, hd)``, k and v ``(B, Hkv, Lk, hd)``: strided views of the projections."""
        e, ekv = self.embed_dim, self.kv_embed_dim
        bias = self._params.get("in_proj_bias")
        if self_attention and self._qkv_same_embed_dim:
            # One matmul for all three projections; q, k and v are column slices of its result.
            qkv = _mm(q_in, self._params["in_proj_weight"].T)
            if bias is not None:
                qkv += bias.astype(qkv.dtype, copy=False)
            qkv = qkv.astype(self.dtype, copy=False)  # 16-bit layers: round the float32 projection once
            q, k, v = qkv[..., :e], qkv[..., e:e + ekv], qkv[..., e + ekv:]
        else:
            wq, wk, wv = self._in_proj_weights()
            q, k, v = _mm(q_in, wq.T), _mm(k_in, wk.T), _mm(v_in, wv.T)
            if bias is not None:
                bias = bias.astype(q.dtype, copy=False)
                q += bias[:e]
                k += bias[e:e + ekv]
                v += bias[e + ekv:]
            q, k, v = (x.astype(self.dtype, copy=False) for x in (q, k, v))
        # (B, L, heads * hd) -> (B, heads, L, hd): splitting the last axis and transposing are views.
        return (x.reshape(x.shape[:2] + (heads, self.head_dim)).transpose(0, 2, 1, 3)
                for x, heads in ((q, self.num_heads), (k, self.num_kv_heads), (v, self.num_kv_heads)))

    def __repr__(self):
        extra = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        extra += f", kdim={self.kdim}, vdim={self.vdim}" if not self._qkv_same_embed_dim else ""
        extra_precision = f", precision={self.precision!r}" if self.precision != "highest" else ""
        extra_precision += ", sinks=True" if self.has_sinks else ""
        return (f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}{extra}, bias={self.bias}, "
                f"batch_first={self.batch_first}, dtype={self.dtype.name}{extra_precision})")


# ---------------------------------------------------------------------------------------------
# Additive (Bahdanau) attention
# ---------------------------------------------------------------------------------------------

class AdditiveAttention:
    """Additive (Bahdanau) attention: ``score[i, j] = v_a · tanh(q_i W_q + k_j W_k)``, softmax over j, times value.

    Computed as ``fusedattn.additive_attention(query @ W_q, key @ W_k, value, score_weight=v_a)``: the
    ``Lq x Lk x units`` tanh tensor is never stored. Single-head; batch-first.

    Args:
        units: the width of the hidden score layer (between 1 and 512, the kernel's head-dim limit).
        query_dim: features of ``query``; key_dim: features of ``key``. Either may be None: it is then
            inferred from the first call (or from :meth:`load_state_dict`), Keras-style, and the
            parameters are created at that point (from ``rng``, so still reproducible).
        dtype: float32 or float64: the parameters' dtype and the dtype every call computes in; or
            float16 / ``ml_dtypes.bfloat16``: parameters, inputs, outputs and gradients in 16 bits,
            projections computed in float32 and rounded once (see the module docstring).
        rng: ``numpy.random.Generator``, an int seed or None, for the initialisation.

    Parameters (NumPy arrays; also the :meth:`state_dict` keys): ``W_q`` ``(query_dim, units)``,
    ``W_k`` ``(key_dim, units)`` (glorot-uniform, Keras Dense's default), ``v_a`` ``(units,)`` (uniform in
    ``+-sqrt(3/units)``, Keras' glorot-uniform for a vector).

    Training: :meth:`backward` ``(dout)`` differentiates the last call, returning the inputs'
    gradients (``dx`` for ``att(x)``; ``(dquery, dkey, dvalue)`` when key was passed) and setting
    :attr:`grads` to ``{"W_q": ..., "W_k": ..., "v_a": ...}`` (:meth:`state_dict`'s keys and shapes).

    Example:
        >>> import numpy as np
        >>> from fusedattn.layers import AdditiveAttention
        >>> att = AdditiveAttention(16, rng=0)
        >>> q = np.ones((2, 3, 8), np.float32); kv = np.ones((2, 5, 8), np.float32)
        >>> out, w = att(q, kv, need_weights=True)
        >>> out.shape, w.shape, att.W_q.shape
        ((2, 3, 8), (2, 3, 5), (8, 16))
        >>> dq, dk, dv = att.backward(np.ones_like(out))
        >>> dq.shape, dk.shape, att.grads["v_a"].shape
        ((2, 3, 8), (2, 5, 8), (16,))
    """

    def __init__(self, units, *, query_dim=None, key_dim=None, dtype=np.float32, rng=None):
        self.units = _check_positive_int(units, "units", upper=MAX_HEAD_DIM)
        self.query_dim = None if query_dim is None else _check_positive_int(query_dim, "query_dim")
        self.key_dim = None if key_dim is None else _check_positive_int(key_dim, "key_dim")
        self.dtype = _check_dtype(dtype)
        self._rng = _check_rng(rng)
        self._params = None
        self._cache = None  # what the last forward call left for backward()
        #: The parameters' gradients from the last :meth:`backward` (``W_q``, ``W_k``, ``v_a``, in the
        #: layer's dtype); None before the first. Replaced, not accumulated, by each backward.
        self.grads = None
        if self.query_dim is not None and self.key_dim is not None:
            self._build()

    @property
    def built(self) -> bool:
        """Whether the parameters exist (both dims known)."""
        return self._params is not None

    def _build(self):
        self._params = {
            # Stored (in, out): the layer computes x @ W, as the formula reads.
            "W_q": _xavier_uniform(self._rng, (self.units, self.query_dim), self.dtype).T.copy(),
            "W_k": _xavier_uniform(self._rng, (self.units, self.key_dim), self.dtype).T.copy(),
            "v_a": _uniform(self._rng, math.sqrt(3.0 / self.units), (self.units,), self.dtype),
        }

    def _param(self, name):
        return None if self._params is None else self._params[name]

    W_q = property(lambda self: self._param("W_q"), doc="``(query_dim, units)``, or None before the layer is built.")
    W_k = property(lambda self: self._param("W_k"), doc="``(key_dim, units)``, or None before the layer is built.")
    v_a = property(lambda self: self._param("v_a"), doc="``(units,)``, or None before the layer is built.")

    def _shapes(self) -> dict:
        return {"W_q": (self.query_dim, self.units), "W_k": (self.key_dim, self.units), "v_a": (self.units,)}

    def state_dict(self) -> dict:
        """Copies of the parameters: ``{"W_q": (query_dim, units), "W_k": (key_dim, units), "v_a": (units,)}``.

        Raises ``RuntimeError`` before the layer is built (dims not yet inferred).

        Example:
            >>> from fusedattn.layers import AdditiveAttention
            >>> {k: v.shape for k, v in AdditiveAttention(4, query_dim=3, key_dim=5, rng=0).state_dict().items()}
            {'W_q': (3, 4), 'W_k': (5, 4), 'v_a': (4,)}
        """
        if self._params is None:
            raise RuntimeError("AdditiveAttention has no parameters yet: query_dim/key_dim are inferred on the first "
                               "call; call the layer once, pass query_dim= and key_dim=, or load_state_dict()")
        return {name: value.copy() for name, value in self._params.items()}

    def load_state_dict(self, state_dict) -> None:
        """Load ``W_q``, ``W_k``, ``v_a`` (strict; copied and cast to the layer's dtype).

        An unbuilt layer takes its missing ``query_dim`` / ``key_dim`` from the arrays' shapes.
        Raises ``ValueError`` listing every missing or unexpected key and shape mismatch.

        Example:
            >>> from fusedattn.layers import AdditiveAttention
            >>> a = AdditiveAttention(4, query_dim=3, key_dim=5, rng=0)
            >>> b = AdditiveAttention(4)
            >>> b.load_state_dict(a.state_dict()); b.query_dim, b.key_dim
            (3, 5)
        """
        shapes = self._shapes()
        if isinstance(state_dict, Mapping):
            # Let an unbuilt layer adopt the dict's dims; a wrong width is still caught below.
            for dim_attr, name in (("query_dim", "W_q"), ("key_dim", "W_k")):
                if getattr(self, dim_attr) is None and name in state_dict and np.ndim(_param_to_numpy(state_dict[name], name)) == 2:
                    shapes[name] = (np.shape(_param_to_numpy(state_dict[name], name))[0], self.units)
        params = _load_params(type(self).__name__, shapes, state_dict, self.dtype)
        self.query_dim, self.key_dim = params["W_q"].shape[0], params["W_k"].shape[0]
        self._params = params
        self._cache = None  # computed with the old parameters: backward() now needs a new forward call

    def __call__(self, query, key=None, value=None, *, mask=None, causal=False, need_weights=False):
        """Attend ``query`` to ``key``/``value`` (self-attention when both are omitted).

        Args:
            query: ``(B, Lq, query_dim)`` or unbatched ``(Lq, query_dim)``.
            key: ``(B, Lk, key_dim)`` (``(Lk, key_dim)``); default ``query``.
            value: ``(B, Lk, Dv)`` (``(Lk, Dv)``), any ``Dv`` from 1 to 512; default ``key``.
                Float inputs of another dtype are cast to the layer's dtype.
            mask: optional, broadcastable to ``(B, Lq, Lk)`` (``(Lq, Lk)`` unbatched); bool True = may
                attend (fusedattn's convention, the opposite of torch's bool masks), float added to scores.
            causal: as :func:`fusedattn.attention` (``True``/``"top_left"`` or ``"bottom_right"``).
            need_weights: also return the attention probabilities ``(B, Lq, Lk)``.

        Returns:
            ``(out, weights)``: ``out`` ``(B, Lq, Dv)`` (``(Lq, Dv)``) in the layer's dtype, ``weights``
            None or ``(B, Lq, Lk)``. Rows that may attend no key give 0.

        The call is remembered for :meth:`backward` (only ``out`` is differentiated).
        """
        self._cache = None  # a failed call must not leave an older call's activations for backward()
        if key is None and value is not None:
            raise ValueError("value was given without key: pass key too (or neither, for self-attention)")
        q_in = _as_input(query, "query", self.dtype)
        k_in = q_in if key is None else _as_input(key, "key", self.dtype)
        v_in = k_in if value is None else _as_input(value, "value", self.dtype)
        if q_in.ndim not in (2, 3):
            raise ValueError(f"query must have shape (B, Lq, query_dim) or unbatched (Lq, query_dim), got shape {q_in.shape}")
        for name, x in (("key", k_in), ("value", v_in)):
            if x.ndim != q_in.ndim:
                raise ValueError(f"{name} must have the same number of dimensions as query, got query {q_in.shape} "
                                 f"and {name} {x.shape}")
        if self._params is None:
            self.query_dim = self.query_dim or q_in.shape[-1]
            self.key_dim = self.key_dim or k_in.shape[-1]
            self._build()
        for name, x, width, arg in (("query", q_in, self.query_dim, "query_dim"), ("key", k_in, self.key_dim, "key_dim")):
            if x.shape[-1] != width:
                raise ValueError(f"{name} must have {width} features ({arg}) in its last axis, got shape {x.shape}")
        if k_in.shape[:-1] != v_in.shape[:-1]:
            raise ValueError(f"key and value must agree on all but the last axis, got key {k_in.shape} and value {v_in.shape}")
        if q_in.shape[:-2] != k_in.shape[:-2]:
            raise ValueError(f"query and key must have the same batch size, got query {q_in.shape} and key {k_in.shape}")

        # 16-bit layers: float32 products rounded once to the layer's dtype, which the fused kernel reads.
        qp = _mm(q_in, self._params["W_q"]).astype(self.dtype, copy=False)
        kp = _mm(k_in, self._params["W_k"]).astype(self.dtype, copy=False)
        # The kernel reads score_weight in the compute dtype (float32 for 16-bit layers); handing it over in
        # that dtype is exact, and _checks rejects a bfloat16 score_weight (np.issubdtype(bfloat16, floating)
        # is False).
        v_a = self._params["v_a"].astype(compute_dtype(self.dtype), copy=False)
        # (B, L, units) inputs are one head each to the kernel: scores (B, Lq, Lk).
        out, lse = fusedattn.additive_attention(qp, kp, v_in, score_weight=v_a, mask=mask, causal=causal,
                                                return_lse=True)
        weights = None
        if need_weights:
            weights = fusedattn.attention_weights(qp, kp, mask=mask, causal=causal, kind="additive", score_weight=v_a)
        self._cache = dict(inputs=(q_in, k_in, v_in), key_given=key is not None, qp=qp, kp=kp, out=out, lse=lse,
                           mask=mask, causal=causal)
        return out, weights

    def backward(self, dout):
        """Gradients of the last call, given ``dout``, the gradient of the loss with respect to its ``out``.

        One fused :func:`fusedattn.additive_attention_backward` (which also gives ``v_a``'s gradient)
        plus NumPy matmuls for the two projections, from what the forward call kept. A float mask is
        a constant; ``need_weights`` has no effect on the gradients.

        Args:
            dout: the shape of the call's ``out``, ``(B, Lq, Dv)`` or ``(Lq, Dv)``; a float array,
                computed in the layer's dtype.

        Returns:
            For a self-attention call ``att(x)`` (key omitted): ``dx`` shaped like ``x``, the sum of
            the query, key and value paths. Otherwise ``(dquery, dkey, dvalue)`` shaped like the call's
            query, key and value, each through that argument alone: when one array was passed in
            several places (``att(q, kv)`` uses ``kv`` as key and value), its total gradient is the sum
            of those entries. All in the layer's dtype.

        Also sets :attr:`grads` to a new dict ``{"W_q": (query_dim, units), "W_k": (key_dim, units),
        "v_a": (units,)}``.

        Raises:
            RuntimeError: no forward call to differentiate (none yet, the last one failed, or
                :meth:`load_state_dict` came after it).
            ValueError / TypeError: ``dout`` of the wrong shape / a non-float ``dout``.

        Example:
            >>> import numpy as np
            >>> from fusedattn.layers import AdditiveAttention
            >>> att = AdditiveAttention(8, dtype=np.float64, rng=0)
            >>> x = np.random.default_rng(1).standard_normal((6, 4))       # unbatched self-attention
            >>> out, _ = att(x, causal=True)
            >>> dx = att.backward(np.ones_like(out))
            >>> dx.shape, sorted(att.grads)
            ((6, 4), ['W_k', 'W_q', 'v_a'])
        """
        c = self._cache
        if c is None:
            raise RuntimeError("AdditiveAttention.backward() needs a forward call first: call the layer (att(x) or "
                               "att(query, key, value)), then backward(dout) with the gradient of its output "
                               "(load_state_dict() discards the last call)")
        dout = _as_input(dout, "dout", self.dtype)
        if dout.shape != c["out"].shape:
            raise ValueError(f"dout must have the shape of the forward call's output {c['out'].shape}, got {dout.shape}")
        w_q, w_k = self._params["W_q"], self._params["W_k"]
        v_a = self._params["v_a"].astype(compute_dtype(self.dtype), copy=False)  # as in the forward call
        dqp, dkp, dv, dv_a = fusedattn.additive_attention_backward(
            dout, c["qp"], c["kp"], c["inputs"][2], c["out"], c["lse"], score_weight=v_a, mask=c["mask"],
            causal=c["causal"])
        x_q, x_k, _ = c["inputs"]
        # qp = x_q @ W_q: dW_q = x_q^T dqp over all (batch, position) rows, dx_q = dqp @ W_q^T.
        # (dv_a comes back in the compute dtype, float32 for a 16-bit layer: cast like the others.)
        self.grads = {name: g.astype(self.dtype, copy=False) for name, g in (
            ("W_q", _mm(x_q.reshape(-1, x_q.shape[-1]).T, dqp.reshape(-1, self.units))),
            ("W_k", _mm(x_k.reshape(-1, x_k.shape[-1]).T, dkp.reshape(-1, self.units))),
            ("v_a", dv_a),
        )}
        dx_q, dx_k = _mm(dqp, w_q.T), _mm(dkp, w_k.T)
        if not c["key_given"]:
            return (dx_q + dx_k + dv).astype(self.dtype, copy=False)
        return dx_q.astype(self.dtype, copy=False), dx_k.astype(self.dtype, copy=False), dv

    def __repr__(self):
        return (f"AdditiveAttention(units={self.units}, query_dim={self.query_dim}, key_dim={self.key_dim}, "
                f"dtype={self.dtype.name})")
