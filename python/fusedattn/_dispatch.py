"""The backend table: who runs a call spec (:mod:`fusedattn._spec`).

Each backend says ``supports(spec)`` -> ``None`` or the reason it cannot, and ``run(spec)`` computes the
public function's result. :func:`dispatch` takes the first that fits, in the order of :data:`BACKENDS`
(the GPU when the call asks for it, then the compiled CPU kernels, then the NumPy reference); when none
fits, its ``NotImplementedError`` lists every backend's reason (as xformers' dispatcher does).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import _backend


def _wants_gpu(spec) -> bool:
    return bool(spec.device_arrays)


class CudaBackend:
    """The optional GPU path (:mod:`fusedattn.cuda`): forward attention, reached with ``device="cuda"``
    or CUDA arrays."""

    name = "cuda"

    def supports(self, spec) -> Optional[str]:
        if not _wants_gpu(spec):
            return "the call is for the CPU (pass device='cuda' or CUDA arrays for the GPU)"
        from . import cuda

        return cuda.refusal(spec)

    def run(self, spec):
        from . import cuda

        return cuda.run(spec)


class CpuBackend:
    """The compiled C++ kernels (SIMD, AMX, OpenMP): every public function."""

    name = "cpu"

    def supports(self, spec) -> Optional[str]:
        if _wants_gpu(spec):
            return f"the call asks for the GPU (device={spec.device!r} or CUDA arrays)"
        if _backend._core is None:
            return "the compiled extension is not available"
        return None

    def run(self, spec):
        return _RUNNERS[spec.op](spec)


class ReferenceBackend:
    """The float64 NumPy oracle (:mod:`fusedattn.reference`): the fallback without the extension. It takes
    the validated call in the user's terms (``spec.user_args``)."""

    name = "reference"

    def supports(self, spec) -> Optional[str]:
        if _wants_gpu(spec):
            return f"the call asks for the GPU (device={spec.device!r} or CUDA arrays)"
        return None

    def run(self, spec):
        from . import reference

        return getattr(reference, spec.entry)(**spec.user_args)


BACKENDS = (CudaBackend(), CpuBackend(), ReferenceBackend())


def dispatch(spec):
    """The first backend of :data:`BACKENDS` that supports ``spec``; ``NotImplementedError`` with every
    backend's reason when none does."""
    reasons = []
    for backend in BACKENDS:
        reason = backend.supports(spec)
        if reason is None:
            return backend
        reasons.append(f"{backend.name}: {reason}")
    raise NotImplementedError(f"no backend can run this {spec.entry}() call:\n  " + "\n  ".join(reasons))


# --- the CPU backend's runs ----------------------------------------------------------------------------

def _forward(spec):
    out = spec.out if spec.out is not None else np.empty(spec.out_shape, dtype=spec.out_dtype)
    lse = np.empty(spec.lse_shape, dtype=spec.compute_dtype) if spec.return_lse else None
    _backend._core.attention_forward(spec, out=spec.kernel_view(out),
                                     lse=None if lse is None else spec.kernel_view(lse, lse=True))
    return (out, lse) if spec.return_lse else out


def _weights(spec):
    weights = np.zeros(spec.lse_shape + (spec.k.shape[-2],), dtype=spec.q.dtype)
    _backend._core.attention_weights(spec, weights=spec.kernel_view(weights))
    return weights


def _backward(spec):
    # Zero-filled: keys no query may see (and every key when Lq = 0) have zero gradients.
    grads = tuple(np.zeros(shape, spec.q.dtype) for shape in spec.grad_shapes)
    dscore_weight = None if spec.score_weight is None else np.zeros(spec.q.shape[-1], spec.compute_dtype)
    dq, dk, dv = (spec.kernel_view(g) for g in grads)
    dout, out, lse = spec.kernel_view(spec.dout), spec.kernel_view(spec.fwd_out), spec.kernel_view(spec.fwd_lse, lse=True)
    _backend._core.attention_backward(spec, dout=dout, out=out, lse=lse, dq=dq, dk=dk, dv=dv,
                                      dscore_weight=dscore_weight)
    if dscore_weight is not None:
        grads += (dscore_weight,)
    if spec.sinks is not None:
        grads += (sinks_gradient(spec.sinks, dout, out, lse),)
    return grads


def sinks_gradient(sinks, dout, out, lse):
    """``dsinks_h = -sum_{b,i} e^(sink_h - lse_{b,h,i}) * rowsum(dout * out)_{b,h,i}``, for kernel views
    (*lead, Hq, Lq, Dv) / (*lead, Hq, Lq). The sink's probability is e^(sink - lse) (lse includes it) and
    d out_i / d sink = -p_sink_i * out_i. O(Lq * Dv) per head, accumulated in float64 in a fixed order:
    deterministic like the rest of the backward."""
    rowsum = np.einsum("...hqd,...hqd->...hq", dout.astype(np.float64), out.astype(np.float64))
    p_sink = np.exp(sinks.astype(np.float64)[:, np.newaxis] - lse.astype(np.float64))
    per_head = -(p_sink * rowsum).reshape((-1,) + rowsum.shape[-2:]).sum(axis=(0, 2))
    return per_head.astype(sinks.dtype)


_RUNNERS = {"forward": _forward, "weights": _weights, "backward": _backward}
