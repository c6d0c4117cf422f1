"""The call spec: one frozen, typed record of an attention call, built once by ``prepare_*``.

Every public entry point is ``spec = prepare_...(...)`` followed by ``dispatch(spec).run(spec)``
(:mod:`fusedattn._dispatch`). ``prepare_*`` holds every user-facing rule and message; the spec it returns
carries the arrays as views in the kernel's ``(*lead, H, L, D)`` layout and every option with its final
type, under the names of the C++ ``AttnParams`` fields it fills (``cpp/include/fusedattn/params.h``).
The C++ bindings read those attributes by name, so a misspelt field is an ``AttributeError``, never a
feature silently switched off. ``entry`` and ``user_args`` keep the validated call in the user's terms
for the backends that take it that way (the NumPy reference, the CUDA path).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType, SimpleNamespace
from typing import Any, Callable, Mapping, Optional, Tuple

import numpy as np

from . import _backend
from .masks import BlockDiagonal
from ._checks import (MAX_HEAD_DIM, UNBOUNDED, _is_float, _is_real, as_float_array, check_alignment, check_dropout,
                      check_int, check_kind, check_like, check_num_threads, check_out, check_out_dtype,
                      check_precision, check_score_weight, check_window, compute_dtype, is_causal)

OPS = ("forward", "weights", "backward")


@dataclass(frozen=True)
class Packing:
    """Packed variable-length sequences: sequence b owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of the
    (1, H, total, D) views; ``diagonal_offset[b]`` is its own diagonal. int64, contiguous."""

    cu_seqlens_q: np.ndarray
    cu_seqlens_k: np.ndarray
    diagonal_offset: np.ndarray


@dataclass(frozen=True)
class AttentionSpec:
    """One validated attention call (see the module docstring). Built only by the ``prepare_*`` functions."""

    op: str                              # "forward", "weights" or "backward"
    entry: str                           # the public function, e.g. "attention", "attention_varlen"
    q: np.ndarray                        # (*lead, Hq, Lq, D) view of the user's q
    k: np.ndarray                        # (*lead, Hkv, Lk, D)
    v: np.ndarray                        # (*lead, Hkv, Lk, Dv); k itself for "weights"
    mask: Optional[np.ndarray]           # bool or compute-dtype view broadcast to (*lead, Hq, Lq, Lk)
    scale: float
    score_weight: Optional[np.ndarray]   # additive scores: w (D,), contiguous, compute dtype; None: dot product
    diagonal_offset: int                 # row i's diagonal is key i + diagonal_offset
    windowed: bool                       # keys outside [diag - window_left, diag + window_right] are skipped
    window_left: int
    window_right: int
    alibi_slopes: Optional[np.ndarray]   # (1 or batch, Hq), contiguous, compute dtype
    softcap: float                       # 0: off
    dropout_p: float
    dropout_seed: int
    q_start: int
    k_start: int
    precision: str                       # "highest", "high" or "medium"
    num_threads: int
    packing: Optional[Packing]
    layout: str                          # "dense", "varlen" (packed (total, H, D)) or "block_diagonal"
    user_rank: int                       # rank of the user's q: 2-D / 3-D inputs have an implicit head axis
    out_shape: Tuple[int, ...]           # the user-facing shapes of the results
    lse_shape: Tuple[int, ...]
    out_dtype: np.dtype
    return_lse: bool = False
    out: Optional[np.ndarray] = None     # the user's out (validated), or None
    dout: Optional[np.ndarray] = None    # backward: the user's dout, out and lse (validated)
    fwd_out: Optional[np.ndarray] = None
    fwd_lse: Optional[np.ndarray] = None
    grad_shapes: Tuple[Tuple[int, ...], ...] = ()
    sinks: Optional[np.ndarray] = None   # (Hq,) logits joining each row's softmax denominator, compute dtype
    k_scale: Optional[np.ndarray] = None  # int8 k / v: float32 per-token scales, (*lead, Hkv, Lk) views
    v_scale: Optional[np.ndarray] = None  # (paged: the pool's (num_blocks, block_size, Hkv))
    block_table: Optional[np.ndarray] = None  # paged k / v: (B, max_blocks) int32, contiguous
    seq_lens: Optional[np.ndarray] = None     # paged: (B,) int64 key lengths; diagonal b is seq_lens[b] - Lq
    device: Any = None                   # None / "cpu" / "cuda" / "cuda:N", as the user gave it
    device_arrays: Mapping[str, Any] = field(default_factory=dict)  # CUDA inputs (q, k, v, mask, out)
    # The call in the user's terms, built on demand (only the reference and CUDA backends read it: building
    # it on every call would cost a small call ~1 us for nothing).
    user_call: Callable[[], Mapping[str, Any]] = dict

    @property
    def user_args(self) -> Mapping[str, Any]:
        return MappingProxyType(self.user_call())

    @property
    def compute_dtype(self) -> np.dtype:
        return compute_dtype(self.q.dtype)

    def kernel_view(self, x: np.ndarray, *, lse: bool = False) -> np.ndarray:
        """The kernel's view of a user-shaped result or gradient (q/k/v/out shapes; ``lse=True``: lse's)."""
        if self.layout == "varlen":  # (total, H, D) -> (1, H, total, D); lse is already (H, total)
            return x[np.newaxis] if lse else x.swapaxes(0, 1)[np.newaxis]
        view = head_view(x, self.user_rank)
        if self.layout == "block_diagonal" and view.ndim < self.q.ndim - lse:
            view = view[np.newaxis]
        return view


_SPEC_FIELDS = frozenset(f.name for f in fields(AttentionSpec))
_SPEC_DEFAULTS = {f.name: f.default for f in fields(AttentionSpec) if f.default is not MISSING}


def head_axis(user_rank: int) -> Optional[int]:
    """Where the implicit head axis goes when the user's q has ``user_rank`` axes: ``(L, D)`` -> 0,
    ``(B, L, D)`` -> 1, else None (the head axis is explicit). The one statement of the rule: it holds for
    q/k/v/mask/out and for lse alike (their head axis sits at the same place)."""
    return 0 if user_rank == 2 else 1 if user_rank == 3 else None


def head_view(x, user_rank: int):
    """Insert the implicit head axis of 2-D ``(L, D)`` and 3-D ``(B, L, D)`` inputs (see head_axis), as a view."""
    axis = head_axis(user_rank)
    return x if axis is None else np.expand_dims(x, axis)


_INT8 = np.dtype(np.int8)


def _is_int8(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and np.dtype(dtype) == _INT8


def check_kv_scales(k, v, k_scale, v_scale, *, scale_shapes=None):
    """int8 k and v with their per-token scales (both or neither): float32 scales of k's / v's shape
    without the last axis (or ``scale_shapes``), for a q of any float dtype (computed in float64 for a
    float64 q, float32 otherwise). Returns the scales as float32 arrays (views when they already are
    float32), or (None, None) for float k and v."""
    quantized = _is_int8(k) or _is_int8(v)
    if (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale and v_scale must be given together (int8 k and v) or not at all, got "
                         f"{'k_scale' if k_scale is not None else 'v_scale'} only")
    if not quantized:
        if k_scale is not None:
            raise ValueError(f"k_scale / v_scale are for int8 k and v (from fusedattn.quantize_kv), got k "
                             f"{np.dtype(k.dtype)} and v {np.dtype(v.dtype)}")
        return None, None
    if not (_is_int8(k) and _is_int8(v)):
        raise TypeError(f"k and v must both be int8 (quantised K/V) or both float, got k {k.dtype} and v {v.dtype}")
    if k_scale is None:
        raise ValueError("int8 k and v need their per-token scales: pass k_scale= and v_scale= (float32, k's and "
                         "v's shapes without the last axis; fusedattn.quantize_kv returns them)")
    scales = []
    for name, s, x, shape in (("k_scale", k_scale, k, None if scale_shapes is None else scale_shapes[0]),
                              ("v_scale", v_scale, v, None if scale_shapes is None else scale_shapes[1])):
        s = s if isinstance(s, np.ndarray) else np.asarray(s)
        if not _is_real(s.dtype):
            raise TypeError(f"{name} must be a real (float32) array, got dtype {s.dtype}")
        expected = x.shape[:-1] if shape is None else shape
        if s.shape != tuple(expected):
            raise ValueError(f"{name} must have shape {tuple(expected)} (one scale per token and kv head), got {s.shape}")
        scales.append(s if s.dtype == np.float32 else s.astype(np.float32))
    return tuple(scales)


def check_sinks(sinks, hq: int, dtype) -> Optional[np.ndarray]:
    """``sinks``: None or (Hq,) finite real logits -> contiguous, in the compute dtype."""
    if sinks is None:
        return None
    s = sinks if isinstance(sinks, np.ndarray) else np.asarray(sinks)
    if not _is_real(s.dtype):
        raise TypeError(f"sinks must be a real-valued array of shape ({hq},), got dtype {s.dtype}")
    if s.shape != (hq,):
        raise ValueError(f"sinks must have shape (Hq,) = ({hq},), one logit per query head, got {s.shape}")
    s = np.ascontiguousarray(s, dtype=compute_dtype(dtype))
    if not np.isfinite(s).all():
        raise ValueError(f"sinks must be finite, got {s.tolist()}")
    return s


def _prepare_core(q, k, v, *, mask, causal, scale, window, alibi_slopes, softcap, q_start, k_start, k_scale=None,
                  v_scale=None, sinks=None):
    """Arrays, shapes and positions shared by every dense entry point; returns a dict of spec fields."""
    q = as_float_array(q, "q")
    if _is_int8(k) or _is_int8(v) or k_scale is not None or v_scale is not None:
        k, v = (x if isinstance(x, np.ndarray) else np.asarray(x) for x in (k, v))
        k_scale, v_scale = check_kv_scales(k, v, k_scale, v_scale)
        for name, x in (("k", k), ("v", v)):
            if x.ndim < 2:
                raise ValueError(f"{name} must have shape (L, D), (B, L, D) or (..., H, L, D) (at least 2 "
                                 f"dimensions), got shape {x.shape}")
    else:
        k = as_float_array(k, "k")
        v = as_float_array(v, "v")
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.ndim == k.ndim == v.ndim):
        raise ValueError(f"q, k and v must have the same number of dimensions, got q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"k and v must agree on all but the last axis (..., Hkv, Lk), got k {k.shape} and v {v.shape}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim D (last axis), got q {q.shape} and k {k.shape}")
    for name, dim in (("D (last axis of q and k)", q.shape[-1]), ("Dv (last axis of v)", v.shape[-1])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name} must be between 1 and {MAX_HEAD_DIM}, got {dim}")
    qh, kh, vh = (head_view(x, q.ndim) for x in (q, k, v))
    if qh.shape[:-3] != kh.shape[:-3]:
        raise ValueError(
            f"q and k must have the same leading (batch) dimensions, got q {q.shape} and k {k.shape}"
        )
    hq, hkv = qh.shape[-3], kh.shape[-3]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads must be a multiple of the number of key/value heads "
            f"(grouped-query attention), got Hq={hq} (q {q.shape}) and Hkv={hkv} (k {k.shape})"
        )
    lq, lk = q.shape[-2], k.shape[-2]
    fields = positions(causal, window, softcap, q_start, k_start, lq, lk)
    fields["alibi_slopes"] = check_alibi_slopes(alibi_slopes, qh.shape[:-3], hq, q.dtype)
    fields["scale"] = check_scale(scale, q.shape[-1])

    prepared_mask = None
    if mask is not None:
        scores_shape = q.shape[:-1] + (lk,)
        if not isinstance(mask, np.ndarray):
            mask = np.asarray(mask)
        if mask.dtype != np.bool_ and not _is_float(mask.dtype):
            raise TypeError(f"mask must be a bool array (True = may attend) or a float array (added to scores), got dtype {mask.dtype}")
        if mask.dtype != np.bool_ and mask.dtype != compute_dtype(q.dtype):
            mask = mask.astype(compute_dtype(q.dtype))  # the small, un-broadcast mask; broadcasting below stays a view
        try:
            mask = np.broadcast_to(mask, scores_shape)
        except ValueError:
            raise ValueError(
                f"mask of shape {mask.shape} is not broadcastable to the scores' shape {scores_shape} "
                f"(..., Hq, Lq, Lk)"
            ) from None
        prepared_mask = head_view(mask, q.ndim)
    fields.update(q=qh, k=kh, v=vh, mask=prepared_mask, user_rank=q.ndim,
                  out_shape=q.shape[:-1] + (v.shape[-1],), lse_shape=q.shape[:-1],
                  k_scale=None if k_scale is None else head_view(k_scale, q.ndim),
                  v_scale=None if v_scale is None else head_view(v_scale, q.ndim),
                  sinks=check_sinks(sinks, hq, q.dtype))
    return fields


def positions(causal, window, softcap, q_start, k_start, lq, lk) -> dict:
    """Which keys each query sees: the kernel's position model, as spec fields.

    Row i's diagonal is key ``i + q_start - k_start`` (top-left alignment, causal=True or "top_left") or
    that plus ``Lk - Lq`` (bottom-right: causal="bottom_right", and for window / ALiBi without causal, as
    in FlashAttention). Causal keeps keys at or before the diagonal; ``window=(left, right)`` keeps keys
    within ``[diagonal - left, diagonal + right]``.
    """
    top_left = check_alignment(causal)
    causal_on = is_causal(causal)
    q_start = check_int(q_start, "q_start", minimum=0)
    k_start = check_int(k_start, "k_start", minimum=0)
    left, right = check_window(window) if window is not None else (UNBOUNDED, UNBOUNDED)
    return {
        "diagonal_offset": q_start - k_start + (0 if top_left else lk - lq),
        "windowed": window is not None or causal_on,
        "window_left": left,
        "window_right": 0 if causal_on else right,
        "softcap": check_softcap(softcap),
        "q_start": q_start,
        "k_start": k_start,
    }


def check_softcap(softcap) -> float:
    """``softcap``: None or 0 (off), else a positive finite number."""
    if softcap is None or (type(softcap) in (int, float) and softcap == 0):
        return 0.0
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a positive number or None, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be positive and finite, got {softcap}")
    return float(softcap)


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def check_alibi_slopes(alibi_slopes, lead, hq: int, dtype, *, rows_name="batch dims") -> Optional[np.ndarray]:
    """``(Hq,)`` or ``(*lead, Hq)`` slopes -> a contiguous (1 or batch, Hq) table in the compute dtype."""
    if alibi_slopes is None:
        return None
    slopes = np.asarray(alibi_slopes)
    if not _is_real(slopes.dtype):
        raise TypeError(f"alibi_slopes must be a real-valued array, got dtype {slopes.dtype}")
    lead = tuple(lead)
    if slopes.shape == (hq,):
        slopes = slopes[np.newaxis]
    elif lead and slopes.shape == lead + (hq,):
        slopes = slopes.reshape(int(np.prod(lead)), hq)
    else:
        raise ValueError(f"alibi_slopes must have shape ({hq},) or {lead + (hq,)} ({rows_name}, Hq), "
                         f"got {slopes.shape}")
    return np.ascontiguousarray(slopes, dtype=compute_dtype(dtype))


def _resolve_dropout(dropout_p, seed, need_seed) -> dict:
    resolved = check_dropout(dropout_p, seed, need_seed=need_seed)
    return {"dropout_p": resolved.get("dropout_p", 0.0), "dropout_seed": resolved.get("seed", 0)}


def _user_dropout(fields) -> dict:
    """dropout_p / seed in the user's terms, the seed resolved (a Generator drew it once)."""
    return {"dropout_p": fields["dropout_p"], "seed": fields["dropout_seed"] if fields["dropout_p"] else None}


def _given(**options) -> dict:
    """The options the user set: the serving options reach the reference only when used."""
    return {name: value for name, value in options.items() if value is not None}


def _finish(fields, *, op, entry, layout, precision, num_threads, out_dtype, return_lse=False, out=None,
            device=None, device_arrays=None, user_args=None, score_weight=None, packing=None, **backward):
    values = dict(_SPEC_DEFAULTS)
    values.update(fields)
    values.update(op=op, entry=entry, layout=layout, precision=precision,
                  num_threads=num_threads, out_dtype=out_dtype, return_lse=bool(return_lse), out=out,
                  device=device, device_arrays=MappingProxyType(device_arrays or {}),
                  user_call=user_args if callable(user_args) else (lambda: user_args or {}),
                  score_weight=score_weight, packing=packing,
                  **backward)
    if len(values) != len(_SPEC_FIELDS):  # a misspelt or missing field: fail here, not in the kernel
        raise TypeError(f"AttentionSpec: unexpected {sorted(set(values) - _SPEC_FIELDS)}, "
                        f"missing {sorted(_SPEC_FIELDS - set(values))}")
    # The generated __init__ of a frozen dataclass sets its 40 fields one object.__setattr__ at a time
    # (~6 us, more than the kernel of a small decode step); filling the instance dict at once is the same
    # object (frozen afterwards, as always) in ~0.5 us.
    spec = object.__new__(AttentionSpec)
    spec.__dict__.update(values)
    return spec


def _check_result_out(out, fields, out_dtype):
    if out is not None:
        check_out(out, fields["out_shape"], fields["q"].dtype,
                  (("q", fields["q"]), ("k", fields["k"]), ("v", fields["v"]), ("mask", fields["mask"])), out_dtype)
    return out


def resolve_threads(num_threads) -> int:
    return check_num_threads(num_threads) or _backend.default_num_threads()


# A decode loop calls attention() token after token with the same shapes (but a longer K / V), dtypes and
# options: validating them anew cost ~45 us a call on a slow core (AMD EPYC Zen 1), more than the kernel
# of a short cache and more than torch's whole SDPA call. A call without mask, slopes, out or score weight
# (sinks and int8 K / V's per-token scales are allowed: a repeat checks them itself, values included), whose
# other options are plain values (None, bool, int, float, str, or a NumPy scalar such as ``1 / np.sqrt(D)``),
# keeps the fields its validation produced, keyed by everything that validation read except the key length; a
# repeat swaps in its arrays, its thread count and the one field that depends on Lk (the diagonal). Anything
# that raised was never kept.
_PLAIN_TYPES = frozenset({type(None), bool, int, float, str, np.bool_, np.float64, np.float32, np.int64, np.int32})
_REPEATS: dict = {}
_MAX_REPEATS = 256


def _plain_options(options: tuple):
    """``options`` and their types, as part of a kept call's key, or None when one is not a plain value."""
    types = tuple(map(type, options))  # the types too: 1 == 1.0 == True, but check_int refuses True
    return options + types if _PLAIN_TYPES.issuperset(types) else None


def _repeat_key(q, k, v, options: tuple):
    """The cache key of a plain call (see _REPEATS), or None when the call does not qualify."""
    if type(q) is not np.ndarray or type(k) is not np.ndarray or type(v) is not np.ndarray:
        return None
    plain = _plain_options(options)
    if plain is None or not q.ndim == k.ndim == v.ndim or k.ndim < 2:
        return None
    k_shape, v_shape = k.shape, v.shape
    return (q.shape, q.dtype, k_shape[:-2], k_shape[-1], k.dtype, v_shape[:-2], v_shape[-1], v.dtype) + plain


def _repeat(kept, q, k, v, threads: int, user_args, k_scale=None, v_scale=None, sinks=None):
    """The spec of a repeated plain call: the kept fields with this call's arrays."""
    template, offset, lk_shift = kept
    lk = k.shape[-2]
    if v.shape[-2] != lk:  # the key left Lk out: a mismatch takes the full validation (and its message)
        return None
    if k_scale is not None and not (_repeat_scale(k_scale, k) and _repeat_scale(v_scale, v)):
        return None  # anything the full validation would convert or refuse takes it
    spec = object.__new__(AttentionSpec)
    values = spec.__dict__
    values.update(template)
    rank = template["user_rank"]
    if rank < 4:
        q, k, v = head_view(q, rank), head_view(k, rank), head_view(v, rank)
    if sinks is not None:
        if not _repeat_sinks(sinks, q.shape[-3], q.dtype):
            return None
        values["sinks"] = sinks
    values["q"], values["k"], values["v"] = q, k, v
    if k_scale is not None:
        values["k_scale"], values["v_scale"] = head_view(k_scale, rank), head_view(v_scale, rank)
    values["num_threads"], values["user_call"], values["diagonal_offset"] = threads, user_args, offset + lk_shift * lk
    return spec


def _repeat_sinks(sinks, hq: int, dtype) -> bool:
    """Whether check_sinks passes ``sinks`` on unchanged: a contiguous (Hq,) array of finite logits in the
    compute dtype (a sink changes per call only if the caller changes it, so its values are checked each time)."""
    return (type(sinks) is np.ndarray and sinks.shape == (hq,) and sinks.dtype == compute_dtype(dtype)
            and sinks.flags.c_contiguous and bool(np.isfinite(sinks).all()))


def _repeat_scale(scale, x) -> bool:
    """Whether int8 x's scales are what check_kv_scales passes on unchanged: float32, x's shape less D."""
    return type(scale) is np.ndarray and scale.dtype == np.float32 and scale.shape == x.shape[:-1]


# The fields a repeat swaps in: a kept template never holds on to a call's arrays.
_CALL_FIELDS = ("q", "k", "v", "k_scale", "v_scale", "sinks", "block_table", "seq_lens", "user_call")


def _template(store: dict, spec) -> dict:
    """spec's fields without the call's arrays, to keep in ``store`` (emptied when full)."""
    if len(store) >= _MAX_REPEATS:
        store.clear()
    template = dict(spec.__dict__)
    template.update(dict.fromkeys(_CALL_FIELDS))
    return template


def _remember(key, spec, lk: int, top_left: bool) -> None:
    template = _template(_REPEATS, spec)
    lk_shift = 0 if top_left else 1
    _REPEATS[key] = (template, spec.diagonal_offset - lk_shift * lk, lk_shift)


def prepare_attention(q, k, v, *, mask=None, causal=False, scale=None, window=None, alibi_slopes=None, softcap=None,
                      q_start=0, k_start=0, dropout_p=0.0, seed=None, return_lse=False, out=None, out_dtype=None,
                      precision="highest", num_threads=None, device=None, score_weight=None, additive=False,
                      sinks=None, k_scale=None, v_scale=None):
    """The spec of :func:`fusedattn.attention` (``additive=True``: :func:`fusedattn.additive_attention`)."""
    threads = resolve_threads(num_threads)

    def user_args():
        args = dict(q=q, k=k, v=v, mask=mask, causal=causal, window=window, alibi_slopes=alibi_slopes,
                    softcap=softcap, q_start=q_start, k_start=k_start, return_lse=return_lse, out=out,
                    out_dtype=out_dtype, **_user_dropout(spec.__dict__))
        args.update({"score_weight": score_weight} if additive else {"scale": scale})
        args.update(_given(sinks=sinks, k_scale=k_scale, v_scale=v_scale))
        return args

    # Array options are never kept, even scalar ones: a scalar mask (True, np.bool_) is broadcast to this call's
    # (Lq, Lk), so its prepared view depends on the key length the key leaves out.
    # int8 K / V with both scales: `scaled` is part of the key, so int8 K / V without them never meet a kept spec.
    scaled = k_scale is not None and v_scale is not None and _is_int8(k) and _is_int8(v)
    without_arrays = (mask is None and alibi_slopes is None and out is None and score_weight is None
                      and (scaled or (k_scale is None and v_scale is None)))
    options = (causal, scale, window, softcap, q_start, k_start, dropout_p, seed, return_lse, out_dtype, precision,
               device, additive, scaled, sinks is not None)
    key = _repeat_key(q, k, v, options) if without_arrays else None
    kept = _REPEATS.get(key) if key is not None else None
    if kept is not None:
        spec = _repeat(kept, q, k, v, threads, user_args, k_scale, v_scale, sinks)  # a key without scaled: both None
        if spec is not None:
            return spec
    precision = check_precision(precision)
    device_arrays = {}
    if _on_device(device, q, k, v):
        q, k, v, mask, device_arrays = _device_stand_ins(q, k, v, mask)
    block_diagonal = _is_block_diagonal(mask)
    if block_diagonal and additive:
        _refuse_additive_packing("additive_attention")
    if block_diagonal and not device_arrays:
        fields, packing = _block_diagonal(q, k, v, mask, causal, scale, window, alibi_slopes, softcap, q_start,
                                          k_start, sinks=sinks)
        layout = "block_diagonal"
    else:  # a BlockDiagonal bound for the GPU is refused by name there (fusedattn.cuda.refusal), not judged here
        layout = "block_diagonal" if block_diagonal else "dense"
        fields = _prepare_core(q, k, v, mask=None if layout == "block_diagonal" else mask, causal=causal,
                               scale=1.0 if additive else scale, window=window, alibi_slopes=alibi_slopes,
                               softcap=softcap, q_start=q_start, k_start=k_start, k_scale=k_scale, v_scale=v_scale,
                               sinks=sinks)
        packing = None
    fields.update(_resolve_dropout(dropout_p, seed, False))
    weight = check_score_weight(score_weight, fields["q"].shape[-1], fields["q"].dtype) if additive else None
    resolved_out = check_out_dtype(out_dtype, fields["q"].dtype)
    if not device_arrays:
        _check_result_out(out, fields, resolved_out)
    spec = _finish(fields, op="forward", entry="additive_attention" if additive else "attention", layout=layout,
                   precision=precision, num_threads=threads, out_dtype=resolved_out, return_lse=return_lse, out=out,
                   device=device, device_arrays=device_arrays, user_args=user_args, score_weight=weight,
                   packing=packing)
    if key is not None and not device_arrays and fields["dropout_p"] == 0:  # key: no mask, so a dense layout
        _remember(key, spec, k.shape[-2], check_alignment(causal))
    return spec


def prepare_weights(q, k, *, mask=None, causal=False, scale=None, kind="dot", score_weight=None, window=None,
                    alibi_slopes=None, softcap=None, q_start=0, k_start=0, sinks=None, num_threads=None):
    """The spec of :func:`fusedattn.attention_weights`."""
    refuse_device_arrays("attention_weights", q, k)
    threads = resolve_threads(num_threads)
    kind = check_kind(kind)
    if kind == "dot" and score_weight is not None:
        raise ValueError("score_weight applies to kind='additive' only")
    fields = _prepare_core(q, k, k, mask=mask, causal=causal, scale=scale, window=window, alibi_slopes=alibi_slopes,
                           softcap=softcap, q_start=q_start, k_start=k_start, sinks=sinks)
    weight = None
    if kind == "additive":  # scale is validated above but additive scores are not scaled
        fields["scale"] = 1.0
        weight = check_score_weight(score_weight, fields["q"].shape[-1], fields["q"].dtype)
    fields.update(dropout_p=0.0, dropout_seed=0)
    user_args = dict(q=q, k=k, mask=mask, causal=causal, scale=scale, kind=kind, score_weight=score_weight,
                     window=window, alibi_slopes=alibi_slopes, softcap=softcap, q_start=q_start, k_start=k_start,
                     **_given(sinks=sinks))
    return _finish(fields, op="weights", entry="attention_weights", layout="dense", precision="highest",
                   num_threads=threads, out_dtype=fields["q"].dtype, user_args=user_args, score_weight=weight)


def prepare_backward(dout, q, k, v, out, lse, *, mask=None, causal=False, scale=None, window=None, alibi_slopes=None,
                     softcap=None, q_start=0, k_start=0, dropout_p=0.0, seed=None, num_threads=None,
                     score_weight=None, additive=False, sinks=None):
    """The spec of :func:`fusedattn.attention_backward` (``additive=True``: the additive one)."""
    refuse_device_arrays("additive_attention_backward" if additive else "attention_backward", dout, q, k, v, out, lse)
    threads = resolve_threads(num_threads)
    shapes = tuple(np.shape(x) for x in (q, k, v))
    if _is_block_diagonal(mask):
        if additive:
            _refuse_additive_packing("additive_attention_backward")
        fields, packing = _block_diagonal(q, k, v, mask, causal, scale, window, alibi_slopes, softcap, q_start,
                                          k_start, sinks=sinks)
        layout = "block_diagonal"
    else:
        fields = _prepare_core(q, k, v, mask=mask, causal=causal, scale=1.0 if additive else scale, window=window,
                               alibi_slopes=alibi_slopes, softcap=softcap, q_start=q_start, k_start=k_start,
                               sinks=sinks)
        packing, layout = None, "dense"
    fields.update(_resolve_dropout(dropout_p, seed, True))
    dtype = fields["q"].dtype
    weight = check_score_weight(score_weight, fields["q"].shape[-1], dtype) if additive else None
    dout = check_like(dout, "dout", fields["out_shape"], dtype)
    out = check_like(out, "out", fields["out_shape"], dtype)
    lse = check_like(lse, "lse", fields["lse_shape"], compute_dtype(dtype))
    user_args = dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse, mask=mask, causal=causal, window=window,
                     alibi_slopes=alibi_slopes, softcap=softcap, q_start=q_start, k_start=k_start,
                     **_user_dropout(fields))
    if additive:
        user_args["score_weight"] = score_weight
    else:
        user_args["scale"] = scale
    user_args.update(_given(sinks=sinks))
    return _finish(fields, op="backward", entry="additive_attention_backward" if additive else "attention_backward",
                   layout=layout, precision="highest", num_threads=threads, out_dtype=dtype, user_args=user_args,
                   score_weight=weight, packing=packing, dout=dout, fwd_out=out, fwd_lse=lse, grad_shapes=shapes)


# --- packed sequences ----------------------------------------------------------------------------------

def _is_block_diagonal(mask) -> bool:
    return isinstance(mask, BlockDiagonal)


def _refuse_additive_packing(entry: str):
    # The packed (varlen) kernels compute dot-product scores only: additive scores over a BlockDiagonal
    # mask came back wrong, not refused.
    raise ValueError(f"{entry}: mask=BlockDiagonal(...) packs sequences for dot-product attention only; for "
                     f"additive scores pass a boolean mask (BlockDiagonal(...).materialize() or per-sequence calls)")


def _block_diagonal(q, k, v, mask, causal, scale, window, alibi_slopes, softcap, q_start, k_start, sinks=None):
    """A dense call with a BlockDiagonal mask: the packed kernel over (1, H, total, D) views of the arrays."""
    if q_start or k_start:
        raise ValueError("q_start / k_start do not combine with a BlockDiagonal mask (positions restart per sequence)")
    fields = _prepare_core(q, k, v, mask=None, causal=causal, scale=scale, window=window, alibi_slopes=None,
                           softcap=softcap, q_start=0, k_start=0, sinks=sinks)
    if fields["q"].shape[:-3] not in ((), (1,)):
        raise ValueError(f"a BlockDiagonal mask packs sequences along L of one batch entry: q's leading dims must be "
                         f"1, got q {np.shape(q)}")
    if (fields["q"].shape[-2], fields["k"].shape[-2]) != (mask.total_q, mask.total_k):
        raise ValueError(f"mask is {mask!r}, for Lq={mask.total_q} and Lk={mask.total_k}; got "
                         f"Lq={fields['q'].shape[-2]} and Lk={fields['k'].shape[-2]}")
    if fields["q"].ndim == 3:  # (L, D) inputs: the packed kernel wants one explicit batch entry
        fields.update({name: fields[name][np.newaxis] for name in ("q", "k", "v")})
    packing = _packing(mask.cu_seqlens_q, mask.cu_seqlens_k, causal)
    fields["alibi_slopes"] = _packed_slopes(alibi_slopes, packing, fields["q"].shape[-3], fields["q"].dtype)
    return fields, packing


def _packing(cu_q, cu_k, causal) -> Packing:
    top_left = check_alignment(causal)
    batch = cu_q.size - 1
    diagonal = np.zeros(batch, np.int64) if top_left else (np.diff(cu_k) - np.diff(cu_q)).astype(np.int64)
    return Packing(cu_q, cu_k, diagonal)


def _packed_slopes(alibi_slopes, packing, hq, dtype):
    if alibi_slopes is None:
        return None
    batch = packing.cu_seqlens_q.size - 1
    slopes = np.asarray(alibi_slopes)
    if slopes.shape not in ((hq,), (batch, hq)):
        raise ValueError(f"alibi_slopes must have shape ({hq},) or ({batch}, {hq}) (sequences, Hq), got {slopes.shape}")
    return check_alibi_slopes(slopes, (batch,), hq, dtype, rows_name="sequences")


def check_cu_seqlens(cu_seqlens, name: str, total: int) -> np.ndarray:
    """``cu_seqlens``: 1-D int32/int64, starting at 0, non-decreasing, ending at ``total``."""
    if not isinstance(cu_seqlens, np.ndarray):
        cu_seqlens = np.asarray(cu_seqlens)
    if cu_seqlens.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise TypeError(f"{name} must have dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.size < 1:
        raise ValueError(f"{name} must be a 1-D array of batch + 1 offsets, got shape {cu_seqlens.shape}")
    if cu_seqlens[0] != 0:
        raise ValueError(f"{name} must start at 0, got {int(cu_seqlens[0])}")
    if (np.diff(cu_seqlens.astype(np.int64)) < 0).any():
        raise ValueError(f"{name} must be non-decreasing (monotone offsets), got {cu_seqlens.tolist()}")
    if cu_seqlens[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {int(cu_seqlens[-1])}")
    return np.ascontiguousarray(cu_seqlens, dtype=np.int64)


def _check_max_seqlen(max_seqlen, name: str, lengths: np.ndarray) -> None:
    if max_seqlen is None:
        return
    if isinstance(max_seqlen, (bool, np.bool_)) or not isinstance(max_seqlen, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(max_seqlen).__name__}")
    longest = int(lengths.max()) if lengths.size else 0
    if max_seqlen < longest:
        raise ValueError(f"{name}={max_seqlen} is smaller than the longest sequence ({longest})")


def _prepare_varlen_core(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window,
                         alibi_slopes, softcap, sinks):
    q, k, v = (as_float_array(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            raise ValueError(f"{name} must be packed as (total, heads, dim), got shape {x.shape}")
    cu_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
    cu_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0])
    if cu_q.size != cu_k.size:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_q.size - 1} and {cu_k.size - 1}")
    _check_max_seqlen(max_seqlen_q, "max_seqlen_q", np.diff(cu_q))
    _check_max_seqlen(max_seqlen_k, "max_seqlen_k", np.diff(cu_k))
    views = [x.swapaxes(0, 1)[np.newaxis] for x in (q, k, v)]  # (1, H, total, D), no copy
    fields = _prepare_core(*views, mask=None, causal=causal, scale=scale, window=window, alibi_slopes=None,
                           softcap=softcap, q_start=0, k_start=0, sinks=sinks)
    packing = _packing(cu_q, cu_k, causal)
    fields["alibi_slopes"] = _packed_slopes(alibi_slopes, packing, fields["q"].shape[-3], q.dtype)
    hq, total_q, dv = fields["q"].shape[-3], q.shape[0], v.shape[-1]
    fields.update(out_shape=(total_q, hq, dv), lse_shape=(hq, total_q), user_rank=3)
    return fields, packing


def prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                   scale=None, window=None, alibi_slopes=None, softcap=None, sinks=None, dropout_p=0.0, seed=None,
                   return_lse=False, out=None, precision="highest", num_threads=None):
    """The spec of :func:`fusedattn.attention_varlen`."""
    refuse_device_arrays("attention_varlen", q, k, v)
    threads = resolve_threads(num_threads)
    precision = check_precision(precision)
    fields, packing = _prepare_varlen_core(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                           scale, window, alibi_slopes, softcap, sinks)
    fields.update(_resolve_dropout(dropout_p, seed, False))
    dtype = fields["q"].dtype
    if out is not None:
        if not isinstance(out, np.ndarray) or out.shape != fields["out_shape"] or out.dtype != dtype or not out.flags.writeable:
            raise ValueError(f"out must be a writeable {dtype} array of shape {fields['out_shape']}")
        check_out(out, fields["out_shape"], dtype, (("q", fields["q"]), ("k", fields["k"]), ("v", fields["v"])))
    user_args = dict(q=q, k=k, v=v, cu_seqlens_q=packing.cu_seqlens_q, cu_seqlens_k=packing.cu_seqlens_k,
                     causal=causal, scale=scale, window=window, alibi_slopes=alibi_slopes, softcap=softcap,
                     return_lse=return_lse, out=out, **_user_dropout(fields), **_given(sinks=sinks))
    return _finish(fields, op="forward", entry="attention_varlen", layout="varlen", precision=precision,
                   num_threads=threads, out_dtype=dtype, return_lse=return_lse, out=out, user_args=user_args,
                   packing=packing)


def prepare_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                            max_seqlen_k=None, causal=False, scale=None, window=None, alibi_slopes=None,
                            softcap=None, sinks=None, dropout_p=0.0, seed=None, num_threads=None):
    """The spec of :func:`fusedattn.attention_varlen_backward`."""
    refuse_device_arrays("attention_varlen_backward", dout, q, k, v, out, lse)
    threads = resolve_threads(num_threads)
    fields, packing = _prepare_varlen_core(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                           scale, window, alibi_slopes, softcap, sinks)
    fields.update(_resolve_dropout(dropout_p, seed, True))
    dtype = fields["q"].dtype
    dout = check_like(dout, "dout", fields["out_shape"], dtype)
    out = check_like(out, "out", fields["out_shape"], dtype)
    lse = check_like(lse, "lse", fields["lse_shape"], compute_dtype(dtype))
    user_args = dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse, cu_seqlens_q=packing.cu_seqlens_q,
                     cu_seqlens_k=packing.cu_seqlens_k, causal=causal, scale=scale, window=window,
                     alibi_slopes=alibi_slopes, softcap=softcap, **_user_dropout(fields), **_given(sinks=sinks))
    return _finish(fields, op="backward", entry="attention_varlen_backward", layout="varlen", precision="highest",
                   num_threads=threads, out_dtype=dtype, user_args=user_args, packing=packing, dout=dout,
                   fwd_out=out, fwd_lse=lse, grad_shapes=tuple(np.shape(x) for x in (q, k, v)))


# --- CUDA inputs -------------------------------------------------------------------------------------

def _on_device(device, *arrays) -> bool:
    """The routing rule: ``device="cuda[:N]"``, or CUDA arrays without device=. Imports the CUDA module
    only when the call is not plain NumPy on the CPU."""
    if device is None and all(isinstance(x, np.ndarray) for x in arrays):
        return False
    from . import cuda

    return cuda.wants_cuda(device, *arrays)


def refuse_device_arrays(entry: str, *arrays) -> None:
    """Entry points the GPU does not have: CUDA arrays get the backend table's answer (every backend's
    reason, NotImplementedError) instead of a failed conversion to NumPy."""
    if all(isinstance(x, np.ndarray) or x is None for x in arrays):
        return
    from . import cuda
    from ._dispatch import dispatch

    if any(cuda.is_device_array(x) for x in arrays):
        dispatch(SimpleNamespace(entry=entry, device_arrays={"cuda arrays": True}, device=None))


def _device_stand_ins(q, k, v, mask):
    """CUDA arrays are validated through zero-stride NumPy stand-ins of their shapes and dtypes; the
    originals travel in ``device_arrays`` to the CUDA backend. NumPy arrays bound for the GPU stay as they are."""
    from . import cuda

    if not any(cuda.is_device_array(x) for x in (q, k, v)):
        return q, k, v, mask, {"numpy": True}
    stand_ins, originals = cuda.stand_ins(q, k, v, mask)
    return (*stand_ins, originals)


# --- paged K/V ---------------------------------------------------------------------------------------

# A serving loop calls attention_paged() (PagedKVCache.attend) step after step with the same q, pools, dtypes and
# options and a new table and lengths. As for attention() (see _REPEATS), a call without slopes or out,
# whose options are plain values, keeps the fields its validation produced, keyed by everything that validation
# read except the table and the lengths; a repeat checks those in full (_check_block_table: every block id a
# sequence reads, as always), int8 scales and sinks as the full checks would pass them, and swaps in its arrays.
_PAGED_REPEATS: dict = {}


def _paged_repeat_key(q, key_cache, value_cache, k_scale, v_scale, options: tuple):
    """The key of a plain paged call (see _PAGED_REPEATS), or None when the call does not qualify."""
    plain = _plain_options(options)
    if plain is None or not (type(q) is type(key_cache) is type(value_cache) is np.ndarray):
        return None
    scaled = k_scale is not None
    if scaled and not (key_cache.dtype == _INT8 and _repeat_scale(k_scale, key_cache) and
                       _repeat_scale(v_scale, value_cache)):
        return None  # scales the full validation converts or refuses
    return (q.shape, q.dtype, key_cache.shape, key_cache.dtype, value_cache.shape, value_cache.dtype, scaled) + plain


def prepare_paged(q, key_cache, value_cache, block_table, seq_lens, *, causal="bottom_right", scale=None, window=None,
                  alibi_slopes=None, softcap=None, sinks=None, k_scale=None, v_scale=None, return_lse=False, out=None,
                  num_threads=None):
    """The spec of :func:`fusedattn.attention_paged`: k and v are the block pools, read through the table."""
    from .paged import _check_block_table, check_paged_args

    threads = resolve_threads(num_threads)

    def user_args():  # the call as the NumPy fallback reruns it: the arrays as validated
        return dict(q=q, key_cache=key_cache, value_cache=value_cache, block_table=table, seq_lens=lens,
                    causal=causal, scale=scale, window=window, alibi_slopes=alibi_slopes, softcap=softcap,
                    return_lse=return_lse, out=out, **_given(sinks=sinks, k_scale=k_scale, v_scale=v_scale))

    key = None
    if alibi_slopes is None and out is None and (k_scale is None) == (v_scale is None):
        key = _paged_repeat_key(q, key_cache, value_cache, k_scale, v_scale,
                                (causal, scale, window, softcap, return_lse, sinks is not None))
    kept = _PAGED_REPEATS.get(key) if key is not None else None
    if kept is not None and (sinks is None or _repeat_sinks(sinks, q.shape[1], q.dtype)):
        num_blocks, block_size = key_cache.shape[:2]
        table, lens = _check_block_table(block_table, seq_lens, q.shape[0], block_size, num_blocks)
        spec = object.__new__(AttentionSpec)
        values = spec.__dict__
        values.update(kept)
        values.update(q=q, k=key_cache, v=value_cache, k_scale=k_scale, v_scale=v_scale, sinks=sinks,
                      block_table=table, seq_lens=lens.astype(np.int64), num_threads=threads, user_call=user_args)
        return spec

    refuse_device_arrays("attention_paged", q, key_cache, value_cache)
    table, lens = check_paged_args(q, key_cache, value_cache, block_table, seq_lens, causal=causal, sinks=sinks,
                                   k_scale=k_scale, v_scale=v_scale, alibi_slopes=alibi_slopes, out=out)
    q, key_cache, value_cache = (x if isinstance(x, np.ndarray) else np.asarray(x) for x in (q, key_cache, value_cache))
    batch, hq, lq, _ = q.shape
    # Each sequence's diagonal is seq_lens[b] - Lq (the C++ bindings derive it from seq_lens): the
    # diagonal_offset of the dense position model is not read for paged calls.
    fields = positions(causal, window, softcap, 0, 0, lq, lq)
    fields["alibi_slopes"] = check_alibi_slopes(alibi_slopes, (batch,), hq, q.dtype)
    fields["scale"] = check_scale(scale, q.shape[-1])
    out_shape = (batch, hq, lq, value_cache.shape[-1])
    if out is not None:
        check_out(out, out_shape, q.dtype, (("q", q), ("key_cache", key_cache), ("value_cache", value_cache)))
    scales = (None, None)
    if key_cache.dtype == np.int8:
        scales = check_kv_scales(key_cache, value_cache, k_scale, v_scale,
                                 scale_shapes=(key_cache.shape[:3], value_cache.shape[:3]))
    fields.update(q=q, k=key_cache, v=value_cache, mask=None, user_rank=4, out_shape=out_shape,
                  lse_shape=out_shape[:-1], sinks=check_sinks(sinks, hq, q.dtype), k_scale=scales[0],
                  v_scale=scales[1], block_table=table, seq_lens=lens.astype(np.int64), dropout_p=0.0,
                  dropout_seed=0)
    spec = _finish(fields, op="forward", entry="attention_paged", layout="dense", precision="highest",
                   num_threads=threads, out_dtype=q.dtype, return_lse=return_lse, out=out, user_args=user_args)
    if key is not None:
        _PAGED_REPEATS[key] = _template(_PAGED_REPEATS, spec)
    return spec
