"""Access to the compiled core, with the reference as the fallback when it cannot be loaded."""
from __future__ import annotations

import os
import warnings

try:
    from . import _core
except ImportError as exc:  # a source checkout without a build, or a platform without a wheel
    _core = None
    warnings.warn(
        f"fusedattn: the compiled extension could not be imported ({exc}); "
        "falling back to the pure-NumPy reference implementation (correct, but much slower).",
        RuntimeWarning,
        stacklevel=2,
    )

HAVE_EXTENSION = _core is not None
ISA_ENV_VAR = "FUSEDATTN_ISA"
_num_threads = None  # None: OpenMP's default (OMP_NUM_THREADS or the number of cores)


def _apply_isa_from_environment() -> None:
    requested = os.environ.get(ISA_ENV_VAR, "").strip().lower()
    if not requested or _core is None:
        return
    force_isa(requested, source=f"environment variable {ISA_ENV_VAR}")


def force_isa(name: str, *, source: str = "force_isa") -> str:
    """Select the kernel's instruction-set path; returns the previously selected one.

    A test and diagnostics hook: ``FUSEDATTN_ISA`` does the same for a whole process.
    Raises ``ValueError`` for an unknown name or one this CPU (or this build) cannot run.
    """
    if _core is None:
        raise RuntimeError("fusedattn: the compiled extension is not available, there is no ISA to select")
    compiled = list(_core.compiled_isas())
    supported = list(_core.supported_isas())
    if name not in compiled:
        raise ValueError(f"{source}: unknown or not compiled ISA {name!r}; this build has {compiled}")
    if name not in supported:
        raise ValueError(f"{source}: ISA {name!r} is not supported by this CPU; it supports {supported}")
    previous = _core.current_isa()
    _core.set_isa(name)
    return previous


def available_isas() -> list:
    """ISA paths both compiled into this build and supported by this CPU, best last."""
    return list(_core.supported_isas()) if _core is not None else []


def default_num_threads() -> int:
    if _num_threads is not None:
        return _num_threads
    return _core.max_threads() if _core is not None else 1


_apply_isa_from_environment()
