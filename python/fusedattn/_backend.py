"""Access to the compiled core, with the reference as the fallback when it cannot be loaded."""
from __future__ import annotations

import numbers
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
AMX_EMULATION_ENV_VAR = "FUSEDATTN_AMX_EMULATION"
DECODE_READ_AHEAD_ENV_VAR = "FUSEDATTN_DECODE_READ_AHEAD"
_num_threads = None  # None: OpenMP's default (OMP_NUM_THREADS or the number of cores)


def _apply_amx_emulation_from_environment() -> None:
    """``FUSEDATTN_AMX_EMULATION=1`` (or ``2``): the amx level on the software model, for a whole process."""
    requested = os.environ.get(AMX_EMULATION_ENV_VAR, "").strip()
    if requested not in ("", "0", "1", "2"):
        raise ValueError(f"environment variable {AMX_EMULATION_ENV_VAR}: expected '1' (the AMX software model), "
                         f"'2' (the model with AMX-FP16) or '0' / empty (off), got {requested!r}")
    if requested in ("", "0") or _core is None:
        return
    try:
        set_amx_emulation(int(requested))
    except ValueError as exc:  # a build without the amx level
        raise ValueError(f"environment variable {AMX_EMULATION_ENV_VAR}={requested}: {exc}") from None


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
        why = ""
        if name == "amx":
            why = f": {_core.amx_status()['reason']}"
        raise ValueError(f"{source}: ISA {name!r} is not supported by this CPU{why}; it supports {supported}")
    previous = _core.current_isa()
    _core.set_isa(name)
    return previous


def set_amx_emulation(mode: int) -> None:
    """Test switch: run the ``amx`` level on an exact software model of the AMX tile instructions.

    ``mode`` 1 models a CPU with AMX-BF16 (any CPU that runs the ``avx512`` level can then select
    ``"amx"``: it appears in :func:`available_isas` and :func:`force_isa` accepts it); 2 models AMX-FP16 too
    (float16 on ``tdpfp16ps``); 0 is the hardware only (and leaves ``amx`` if this CPU cannot run it).
    The model gives the tiles' results bit for bit: it is for tests, and for measuring the amx level's
    accuracy where there are no tiles. While it is on, ``amx`` is the best supported level, so a process
    that has not chosen one yet defaults to it. ``FUSEDATTN_AMX_EMULATION`` does the same for a whole process.
    Raises ``ValueError`` for another mode or a build without the amx level.
    """
    if _core is None:
        raise RuntimeError("fusedattn: the compiled extension is not available, there is no amx level to emulate")
    if isinstance(mode, bool) or not isinstance(mode, numbers.Integral):
        raise TypeError(f"set_amx_emulation: mode must be an int 0, 1 or 2, got {type(mode).__name__}")
    _core.set_amx_emulation(int(mode))


def set_decode_read_ahead(mode) -> None:
    """Whether decode prefetches contiguous one-row K / V streams in software: ``True``, ``False``, or ``None``
    for the CPU's default (on where the CPU is Intel's: the hardware prefetchers left such decode at 82-89% of
    the read bandwidth on the Xeon measured, the requests took it to 93-99%; on AMD they cost up to 20%).

    Paged caches and GQA groups are always read ahead; results are the same bits either way.
    ``FUSEDATTN_DECODE_READ_AHEAD=1`` / ``0`` does the same for a whole process; ``backend_info()`` reports
    the choice as ``decode_read_ahead``.
    """
    if mode is not None and not isinstance(mode, bool):
        raise TypeError(f"set_decode_read_ahead: mode must be True, False or None, got {type(mode).__name__}")
    if _core is None:
        raise RuntimeError("fusedattn: the compiled extension is not available, there is no decode kernel to tune")
    _core.set_decode_read_ahead(-1 if mode is None else int(mode))


def _apply_decode_read_ahead_from_environment() -> None:
    requested = os.environ.get(DECODE_READ_AHEAD_ENV_VAR, "").strip()
    if requested not in ("", "0", "1"):
        raise ValueError(f"environment variable {DECODE_READ_AHEAD_ENV_VAR}: expected '1' (on), '0' (off) or "
                         f"empty (the CPU's default), got {requested!r}")
    if requested and _core is not None:
        set_decode_read_ahead(requested == "1")


def available_isas() -> list:
    """ISA paths both compiled into this build and supported by this CPU, best last."""
    return list(_core.supported_isas()) if _core is not None else []


def default_num_threads() -> int:
    if _num_threads is not None:
        return _num_threads
    return _core.max_threads() if _core is not None else 1


_apply_amx_emulation_from_environment()  # first: it decides whether FUSEDATTN_ISA=amx can be selected
_apply_isa_from_environment()
_apply_decode_read_ahead_from_environment()
