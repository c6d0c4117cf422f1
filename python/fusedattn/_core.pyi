"""Type stub of fusedattn's compiled core (cpp/bindings/module.cpp). Private: use the fusedattn package.

The kernels check only what they rely on; the user-facing validation (shapes, dtypes, messages) lives
in fusedattn._checks. Arrays are ``(*lead, H, L, D)`` views in the kernel's layout.
"""
from typing import Optional, Tuple

import numpy as np
import numpy.typing as npt

__version__: str

_Array = npt.NDArray[np.floating]
_Packed = Tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]

def attention_forward(
    q: _Array,
    k: _Array,
    v: _Array,
    mask: Optional[np.ndarray],
    positions: dict,
    scale: float,
    out: _Array,
    lse: Optional[_Array],
    num_threads: int,
    score_weight: Optional[_Array] = None,
    packed: Optional[_Packed] = None,
) -> None:
    """Fused attention forward; writes ``out`` (and ``lse`` when given). ``score_weight``: additive scores.

    ``positions["precision"]`` (optional): "highest" | "high" | "medium", for float32 on the amx level.
    """

def attention_weights(
    q: _Array,
    k: _Array,
    mask: Optional[np.ndarray],
    positions: dict,
    scale: float,
    score_weight: Optional[_Array],
    weights: _Array,
    num_threads: int,
) -> None:
    """Softmax probabilities into ``weights`` ``(*lead, Hq, Lq, Lk)``, zero-filled by the caller."""

def attention_backward(
    dout: _Array,
    q: _Array,
    k: _Array,
    v: _Array,
    out: _Array,
    lse: _Array,
    mask: Optional[np.ndarray],
    positions: dict,
    scale: float,
    dq: _Array,
    dk: _Array,
    dv: _Array,
    num_threads: int,
    score_weight: Optional[_Array] = None,
    dscore_weight: Optional[_Array] = None,
    packed: Optional[_Packed] = None,
) -> None:
    """Gradients into ``dq``, ``dk``, ``dv`` (and ``dscore_weight``); bit-identical at any thread count."""

def compiled_isas() -> list[str]: ...
def supported_isas() -> list[str]: ...
def current_isa() -> str: ...
def set_isa(name: str) -> None: ...
def amx_status() -> dict:
    """What the amx level needs and has: ``compiled``, ``cpu`` (AMX-TILE + AMX-BF16), ``cpu_fp16``,
    ``native_fp16``, ``os`` (tile state granted), ``emulated`` (0, 1 or 2) and ``reason`` ('' when available)."""

def decode_read_ahead() -> bool:
    """Whether decode prefetches contiguous one-row K / V streams in software (default: on Intel CPUs)."""

def set_decode_read_ahead(mode: int) -> None:
    """1 on, 0 off, -1 the CPU's default: decode's software prefetch of contiguous one-row K / V streams."""

def set_amx_emulation(mode: int) -> None:
    """Test switch: 1 runs the amx level on the software model of the tile instructions (any AVX-512 CPU),
    2 models AMX-FP16 too, 0 is the hardware. ``ValueError`` for other modes or a build without amx."""

def measure_fma_peak_gflops(num_threads: int) -> float:
    """fp32 FMA throughput of the selected ISA on ``num_threads`` threads, GFLOP/s."""

def measure_read_bandwidth_gbs(num_threads: int, bytes: int = ...) -> float:
    """Streaming read bandwidth over a buffer of ``bytes`` (default 512 MiB), GB/s."""

def max_threads() -> int: ...
def openmp() -> bool: ...

MAX_HEAD_DIM: int  # the largest head dim D and value dim Dv the kernels take
