"""The public attention API: each function is ``spec = prepare_...(...)`` (:mod:`fusedattn._spec`, every rule
and message) then ``dispatch(spec).run(spec)`` (:mod:`fusedattn._dispatch`: the CUDA path, the C++ kernels or
the NumPy reference)."""
from __future__ import annotations

import numpy as np

from . import _backend
from ._checks import PRECISIONS, check_dropout, check_num_threads
from ._dispatch import dispatch
from ._spec import prepare_attention, prepare_backward, prepare_weights

__all__ = ["attention", "additive_attention", "attention_weights", "attention_backward", "attention_vjp",
           "additive_attention_backward", "backend_info", "set_num_threads", "get_num_threads"]

def _package_version() -> str:
    """pyproject.toml's version: compiled into the extension (cheap), else from the installed metadata
    (importlib.metadata costs ~40 ms of import time, so only the fallback without the extension pays it)."""
    version = getattr(_backend._core, "__version__", None)
    if version:
        return version
    try:
        from importlib.metadata import version as _dist_version

        return _dist_version("fusedattn")
    except Exception:  # running from a source tree that was never installed
        return "0+unknown"


__version__ = _package_version()


def _cuda_info() -> dict:
    from . import cuda

    return cuda.info()


def attention(q, k, v, *, mask=None, causal=False, scale=None, window=None, alibi_slopes=None, softcap=None, sinks=None,
              q_start=0, k_start=0, dropout_p=0.0, seed=None, k_scale=None, v_scale=None, return_lse=False, out=None,
              out_dtype=None, precision="highest", num_threads=None, device=None):
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
        window: ``(left, right)``: query i sees keys within ``[d(i) - left, d(i) + right]`` of its diagonal
            ``d(i)`` (None or -1: unbounded on that side; with causal, right is 0). Key tiles outside the
            band are skipped, so a sliding window costs O(L * window).
        alibi_slopes: ``(Hq,)`` or ``(..., Hq)`` (leading dims of q): adds ``-slope * |d(i) - j|`` (ALiBi).
        softcap: ``c > 0``: scores become ``c * tanh(s / c)`` (Gemma-2 style), before ALiBi and masking,
            so masked keys keep zero probability.
        sinks: ``(Hq,)`` attention sinks (gpt-oss): one logit per query head that joins every row's softmax
            denominator but has no value, ``out_i = sum_j e^s_ij v_j / (e^sink + sum_j e^s_ij)``; lse includes
            it, and a row that sees no key gets 0 and lse = sink.
        q_start, k_start: global positions of this call's first query / key, so that a chunk of a longer
            sequence gets exactly its part of the causal / window / ALiBi pattern.
            The diagonal is ``d(i) = i + q_start - k_start``, plus ``Lk - Lq`` unless causal is True /
            ``"top_left"`` (bottom-right alignment, FlashAttention's convention for window and ALiBi).
            Since that ``Lk - Lq`` is the chunk's own, chunk with ``causal=True`` (top-left) and, for a
            bottom-right pattern, add the *global* ``Lk - Lq`` to ``q_start`` yourself (as
            ``fusedattn.dask`` does).
        dropout_p, seed: dropout on the probabilities (after the softmax, scaled by ``1 / (1 - p)``); the
            mask is a pure function of ``seed`` (an int, or a ``numpy.random.Generator`` to draw one) and the
            element's position, so it is the same at any thread count and the backward pass regenerates it.
        k_scale, v_scale: int8 ``k`` and ``v`` (quantised K/V, :func:`fusedattn.quantize_kv`) with one
            float32 scale per token and kv head, shaped like ``k`` / ``v`` without the last axis: the key is
            ``k_scale * k``, dequantised inside the fused loop (never a float copy). q may be any float dtype:
            float64 q computes in float64, the others in float32; the output is q's dtype.
        return_lse: also return the log-sum-exp of each row's scaled, masked scores (before dropout), in
            the compute dtype (float32 for 16-bit inputs).
        out_dtype: None (the inputs' dtype) or float32 for float16 / bfloat16 inputs.
        out: optional array of the output's shape and dtype to write into (must not overlap inputs).
        precision: how float32 products may run, in ``torch.set_float32_matmul_precision``'s words.
            ``"highest"`` (default): fp32 FMA. ``"high"`` and ``"medium"`` opt float32 inputs in to the matrix
            unit on the ``amx`` ISA level (Intel AMX tiles): ``Q @ K^T`` and ``P @ V`` run on the tiles
            with each fp32 operand split into two bfloat16 (``"high"``, bf16x3) or rounded to one
            (``"medium"``). Max abs error vs float64 on unit-normal q, k, v of shape 1x8x512x512, D=64 (four
            seeds, causal or not): ``"highest"`` 5e-7 to 2e-6, ``"high"`` 4e-6 to 2e-5, ``"medium"`` 2e-3
            to 1.1e-2 (measured on the exact software model of the tiles, so the same on hardware).
            Decode-sized calls (``Lq <= 4``) stay on vectors. Everywhere else (other ISA levels, float64 and
            16-bit inputs, the CUDA path, the NumPy fallback) the value is validated and ignored: the
            ``"highest"`` path runs.
            ``backend_info()["float32_precision"]`` says what each mode runs as here.
        num_threads: OpenMP threads for this call (default: :func:`get_num_threads`).
        device: None or ``"cpu"``: this CPU. ``"cuda"`` / ``"cuda:N"``: the optional CUDA path
            (:mod:`fusedattn.cuda`; NumPy arrays are copied over and back). CUDA arrays (CuPy, torch, any
            ``__cuda_array_interface__`` / DLPack producer) go there without it and get results of
            their own kind on their device and stream.

    dtypes: float32, float64, float16 and ``ml_dtypes.bfloat16`` (16-bit inputs accumulate in float32).
    On CPUs with AVX512-BF16 (ISA ``"avx512bf16"``) bfloat16 inputs with bfloat16 output use native
    ``vdpbf16ps`` dot products, which round the probabilities to bfloat16 before ``P @ V`` exactly as
    torch's bfloat16 SDPA does (the error stays at torch's); ``out_dtype=np.float32`` keeps them in
    float32 instead.

    Returns:
        ``out`` of shape ``(..., Hq, Lq, Dv)`` in the inputs' dtype (or ``out_dtype``), and with
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
    spec = prepare_attention(q, k, v, mask=mask, causal=causal, scale=scale, window=window, alibi_slopes=alibi_slopes,
                             softcap=softcap, sinks=sinks, q_start=q_start, k_start=k_start, dropout_p=dropout_p,
                             seed=seed, k_scale=k_scale, v_scale=v_scale, return_lse=return_lse, out=out,
                             out_dtype=out_dtype, precision=precision, num_threads=num_threads, device=device)
    return dispatch(spec).run(spec)


def additive_attention(q, k, v, *, score_weight=None, mask=None, causal=False, window=None, alibi_slopes=None,
                       softcap=None, q_start=0, k_start=0, dropout_p=0.0, seed=None, return_lse=False, out=None,
                       out_dtype=None, num_threads=None):
    """Fused additive (Bahdanau / Keras ``AdditiveAttention``) attention.

    ``score[i, j] = sum_d w_d * tanh(q[i, d] + k[j, d])``, softmax over ``j`` (with ``mask`` and ``causal``
    exactly as in :func:`attention`), then ``@ v``. Computed tile by tile with an online softmax and a
    vectorised tanh: neither the ``Lq x Lk x D`` tanh terms nor the ``Lq x Lk`` scores are ever stored.

    The Bahdanau form ``v_a^T tanh(W_q q + W_k k)`` is this function after the two projections::

        out = fa.additive_attention(query @ W_q, keys @ W_k, values, score_weight=v_a)

    (:class:`fusedattn.AdditiveAttention` is that layer.)

    Args:
        q: ``(..., Hq, Lq, D)``; ``(B, L, D)`` and ``(L, D)`` as in :func:`attention`.
        k: ``(..., Hkv, Lk, D)``, same leading dims; ``Hq % Hkv == 0`` (grouped-query attention).
        v: ``(..., Hkv, Lk, Dv)``.
        score_weight: ``w`` of shape ``(D,)`` (Keras's ``scale`` when ``use_scale=True``); default all ones.
        mask, causal, window, alibi_slopes, softcap, q_start, k_start, return_lse, out, num_threads: as in
            :func:`attention`. There is no ``scale``.

    Returns:
        ``out`` ``(..., Hq, Lq, Dv)`` in the inputs' dtype (float32 / float64), or ``(out, lse)``.

    Example:
        >>> import numpy as np, fusedattn as fa
        >>> q, k, v = (np.random.rand(2, 10, 16).astype(np.float32) for _ in range(3))
        >>> fa.additive_attention(q, k, v, score_weight=np.full(16, 0.5, np.float32)).shape
        (2, 10, 16)
    """
    spec = prepare_attention(q, k, v, score_weight=score_weight, additive=True, mask=mask, causal=causal,
                             window=window, alibi_slopes=alibi_slopes, softcap=softcap, q_start=q_start,
                             k_start=k_start, dropout_p=dropout_p, seed=seed, return_lse=return_lse, out=out,
                             out_dtype=out_dtype, num_threads=num_threads)
    return dispatch(spec).run(spec)


def attention_weights(q, k, *, mask=None, causal=False, scale=None, kind="dot", score_weight=None, window=None,
                      alibi_slopes=None, softcap=None, sinks=None, q_start=0, k_start=0, num_threads=None):
    """The attention probabilities, for inspection: ``softmax(scores + mask)`` of shape ``(..., Hq, Lq, Lk)``.

    Unlike :func:`attention`, this **materialises** the ``Lq x Lk`` matrix on purpose (it is the result).
    The C++ kernels compute it from the same score tiles as the fused path: a first pass over the keys
    for each row's max and sum, a second that writes the normalised probabilities.

    Args:
        q: ``(..., Hq, Lq, D)`` (or ``(B, Lq, D)``, ``(Lq, D)``); k: ``(..., Hkv, Lk, D)``.
        mask, causal, scale, window, alibi_slopes, softcap, sinks, q_start, k_start: as in :func:`attention`
            (``scale`` applies to ``kind="dot"`` only; with sinks each row sums to ``1 - e^(sink - lse)``).
        kind: ``"dot"`` (scaled dot product) or ``"additive"`` (as :func:`additive_attention`).
        score_weight: ``(D,)``, for ``kind="additive"`` (default all ones).
        num_threads: as in :func:`attention`.

    Returns:
        The weights in the inputs' dtype; each row sums to 1, and rows that may attend no key are all 0.

    Example:
        >>> import numpy as np, fusedattn as fa
        >>> q, k = np.random.rand(4, 8).astype(np.float32), np.random.rand(6, 8).astype(np.float32)
        >>> w = fa.attention_weights(q, k, causal=True)
        >>> w.shape, bool(np.allclose(w.sum(-1), 1))
        ((4, 6), True)
    """
    spec = prepare_weights(q, k, mask=mask, causal=causal, scale=scale, kind=kind, score_weight=score_weight,
                           window=window, alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, q_start=q_start,
                           k_start=k_start, num_threads=num_threads)
    return dispatch(spec).run(spec)


def attention_backward(dout, q, k, v, out, lse, *, mask=None, causal=False, scale=None, window=None, alibi_slopes=None,
                       softcap=None, sinks=None, q_start=0, k_start=0, dropout_p=0.0, seed=None, num_threads=None):
    """Gradients of :func:`attention` with respect to q, k and v, by the fused backward kernel.

    FlashAttention-2's backward pass on the CPU: the probabilities are recomputed tile by tile from the
    saved ``lse`` (no ``Lq x Lk`` buffer), with ``D_i = rowsum(dout_i * out_i)``. The result is
    deterministic: the same inputs give bit-identical gradients at any ``num_threads``.

    Args:
        dout: ``(..., Hq, Lq, Dv)``, the gradient of the loss with respect to ``out``.
        q, k, v, mask, causal, scale, window, alibi_slopes, softcap, sinks, q_start, k_start: exactly as passed
            to the forward :func:`attention` (soft-capping is differentiated through; ALiBi slopes are constants).
        out, lse: the forward's results, from ``attention(..., return_lse=True)``.
        num_threads: as in :func:`attention`.

    Returns:
        ``(dq, dk, dv)`` with the shapes and dtype of ``q``, ``k``, ``v``, and with ``sinks`` also ``dsinks``
        ``(Hq,)`` in the compute dtype: ``-sum_i e^(sink - lse_i) * rowsum(dout_i * out_i)``. With grouped-query attention
        ``dk``/``dv`` are summed over the query heads that share each kv head. A float ``mask`` is a
        constant: it gets no gradient. Rows that attend no key contribute nothing (their ``dq`` is 0).

    Example:
        >>> import numpy as np, fusedattn as fa
        >>> q, k, v = (np.random.rand(2, 4, 16, 8) for _ in range(3))
        >>> out, lse = fa.attention(q, k, v, causal=True, return_lse=True)
        >>> dq, dk, dv = fa.attention_backward(np.ones_like(out), q, k, v, out, lse, causal=True)
        >>> dq.shape, dk.shape, dv.shape
        ((2, 4, 16, 8), (2, 4, 16, 8), (2, 4, 16, 8))
    """
    spec = prepare_backward(dout, q, k, v, out, lse, mask=mask, causal=causal, scale=scale, window=window,
                            alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, q_start=q_start, k_start=k_start,
                            dropout_p=dropout_p, seed=seed, num_threads=num_threads)
    return dispatch(spec).run(spec)


def additive_attention_backward(dout, q, k, v, out, lse, *, score_weight=None, mask=None, causal=False,
                                window=None, alibi_slopes=None, softcap=None, q_start=0, k_start=0, dropout_p=0.0,
                                seed=None, num_threads=None):
    """Gradients of :func:`additive_attention` with respect to q, k, v and ``score_weight``.

    The same fused, deterministic backward pass as :func:`attention_backward`, with the additive score's
    derivatives (``t = tanh(q_d + k_d)`` recomputed per tile): ``ds/dq_d = ds/dk_d = w_d (1 - t^2)`` and
    ``ds/dw_d = t``.

    Args:
        dout: ``(..., Hq, Lq, Dv)``, the gradient of the loss with respect to ``out``.
        q, k, v, score_weight, mask, causal, window, alibi_slopes, softcap, q_start, k_start: exactly as
            passed to :func:`additive_attention`.
        out, lse: its results with ``return_lse=True``.

    Returns:
        ``(dq, dk, dv, dscore_weight)``: the shapes and dtype of ``q``, ``k``, ``v`` and ``(D,)``
        (computed even when ``score_weight`` was left as the default ones).

    Example:
        >>> import numpy as np, fusedattn as fa
        >>> q, k, v = (np.random.rand(6, 4) for _ in range(3))
        >>> out, lse = fa.additive_attention(q, k, v, return_lse=True)
        >>> [g.shape for g in fa.additive_attention_backward(np.ones_like(out), q, k, v, out, lse)]
        [(6, 4), (6, 4), (6, 4), (4,)]
    """
    spec = prepare_backward(dout, q, k, v, out, lse, score_weight=score_weight, additive=True, mask=mask,
                            causal=causal, window=window, alibi_slopes=alibi_slopes, softcap=softcap,
                            q_start=q_start, k_start=k_start, dropout_p=dropout_p, seed=seed,
                            num_threads=num_threads)
    return dispatch(spec).run(spec)


def attention_vjp(q, k, v, **kwargs):
    """Forward pass plus a closure for the backward pass: ``out, backward = attention_vjp(q, k, v, ...)``.

    ``kwargs`` are those of :func:`attention` (``mask``, ``causal``, ``scale``, ``num_threads``);
    ``backward(dout)`` returns ``(dq, dk, dv)`` via :func:`attention_backward`.

    Example:
        >>> import numpy as np, fusedattn as fa
        >>> q = k = v = np.random.rand(8, 4)
        >>> out, backward = fa.attention_vjp(q, k, v, causal=True)
        >>> [g.shape for g in backward(np.ones_like(out))]
        [(8, 4), (8, 4), (8, 4)]
    """
    for name in ("return_lse", "out"):
        if name in kwargs:
            raise TypeError(f"attention_vjp() does not take {name!r}: it always keeps the lse it needs")
    if kwargs.get("dropout_p", 0) and not isinstance(kwargs.get("seed"), (int, np.integer)):
        # One concrete seed for both passes: the backward must regenerate the forward's dropout mask.
        kwargs["seed"] = check_dropout(kwargs["dropout_p"], kwargs.get("seed"))["seed"]
    out, lse = attention(q, k, v, return_lse=True, **kwargs)
    backward_kwargs = {name: kwargs[name] for name in ("mask", "causal", "scale", "window", "alibi_slopes", "softcap",
                                                      "sinks", "q_start", "k_start", "dropout_p", "seed", "num_threads")
                       if name in kwargs}

    def backward(dout):
        return attention_backward(dout, q, k, v, out, lse, **backward_kwargs)

    return out, backward


def set_num_threads(num_threads: int) -> None:
    """Bound the OpenMP threads every later call uses (``None`` restores the default)."""
    _backend._num_threads = check_num_threads(num_threads)


def get_num_threads() -> int:
    """The number of threads a call without ``num_threads=`` uses."""
    return _backend.default_num_threads()


def backend_info() -> dict:
    """What this installation runs on.

    Returns a dict: ``isa`` (the selected instruction-set path), ``compiled_isas``, ``supported_isas``
    (compiled and runnable on this CPU), ``num_threads``, ``openmp``, ``version``, ``cuda`` (a dict:
    ``built``, ``devices`` with each one's ``index``, ``name`` and ``compute_capability``, and ``error``
    saying why there are none), ``extension`` (False when running on the NumPy reference fallback),
    ``amx``, ``float32_precision`` and ``decode_read_ahead``.

    ``amx`` says what the ``amx`` level (Intel AMX tiles) needs and has: ``compiled`` (in this build),
    ``cpu`` (CPUID: AMX-TILE and AMX-BF16), ``cpu_fp16`` (AMX-FP16), ``native_fp16`` (float16 on
    ``tdpfp16ps``), ``os`` (the OS granted the tile state), ``emulated`` (0, or the mode of the software
    model, :func:`fusedattn._backend.set_amx_emulation`) and ``reason`` (why the level is unavailable,
    ``""`` when it is available).

    ``float32_precision`` maps each ``precision=`` of :func:`attention` to what it runs as on the selected
    ISA: ``{"highest": "fp32 FMA", "high": "bf16x3 on AMX tiles", "medium": "bf16 on AMX tiles"}`` on
    ``amx``; elsewhere ``"high"`` and ``"medium"`` run as ``"highest"``.

    ``decode_read_ahead``: whether decode prefetches contiguous one-row K / V streams in software (on by
    default where the CPU is Intel's; :func:`fusedattn._backend.set_decode_read_ahead`).

    Example:
        >>> import fusedattn as fa
        >>> fa.backend_info()["isa"] in fa.backend_info()["compiled_isas"]
        True
        >>> sorted(fa.backend_info()["float32_precision"])
        ['high', 'highest', 'medium']
    """
    core = _backend._core
    if core is None:
        return {"isa": "reference", "compiled_isas": ["reference"], "supported_isas": ["reference"],
                "num_threads": 1, "openmp": False, "version": __version__, "cuda": _cuda_info(),
                "extension": False, "amx": _NO_EXTENSION_AMX.copy(), "decode_read_ahead": False,
                "float32_precision": dict.fromkeys(PRECISIONS, "float64 NumPy reference (precision is ignored)")}
    isa = core.current_isa()
    return {
        "isa": isa,
        "compiled_isas": list(core.compiled_isas()),
        "supported_isas": list(core.supported_isas()),
        "num_threads": get_num_threads(),
        "openmp": bool(core.openmp()),
        "version": __version__,
        "cuda": _cuda_info(),
        "extension": True,
        "amx": dict(core.amx_status()),
        "float32_precision": _float32_precision(isa),
        "decode_read_ahead": bool(core.decode_read_ahead()),
    }


_NO_EXTENSION_AMX = {"compiled": False, "cpu": False, "cpu_fp16": False, "native_fp16": False, "os": False,
                     "emulated": 0, "reason": "the compiled extension is not available"}


def _float32_precision(isa: str) -> dict:
    """What each ``precision=`` runs as for float32 inputs on ``isa`` (see :func:`attention`)."""
    if isa == "amx":
        return {"highest": "fp32 FMA", "high": "bf16x3 on AMX tiles", "medium": "bf16 on AMX tiles"}
    fallback = "fp32 FMA (no AMX: runs as 'highest')"
    return {"highest": "fp32 FMA", "high": fallback, "medium": fallback}
