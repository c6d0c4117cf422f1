"""The optional CUDA path: ``fusedattn.attention(q, k, v, ..., device="cuda")`` on NVIDIA GPUs.

Compiled only with ``pip install . -Ccmake.define.FUSEDATTN_CUDA=ON`` (the ``fusedattn._cuda`` module).
It takes

* NumPy arrays with ``device="cuda"`` / ``"cuda:N"``: copied to the device, computed, copied back (a
  NumPy result);
* arrays that live on a CUDA device, through ``__cuda_array_interface__`` (CuPy, Numba, ...) or DLPack
  (torch CUDA tensors, ...): read in place, any strides, and the result is the same kind of array on the
  same device, enqueued on the same stream (CuPy's / torch's current stream), without synchronising.
  Such arrays go to the GPU without ``device=``.

Semantics and validation are the CPU path's (``_spec.prepare_attention`` runs on every call, so shapes, masks and
causal alignments are judged, and worded, identically). The GPU computes a subset: float32, float16 and
bfloat16; D and Dv up to 256; bool / float masks with broadcasting; both causal alignments with
``q_start`` / ``k_start``; grouped-query heads; ``return_lse``; ``out`` / ``out_dtype``. Other options
(window, alibi_slopes, softcap, dropout, sinks, int8 K/V, BlockDiagonal masks) raise ``NotImplementedError``.

Status: the kernels are compiled in CI but have not yet been run on a GPU (see the documentation's page
"The CUDA path and its status", docs/user_guide/cuda.md).
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ._checks import is_half_dtype
from ._spec import head_axis

try:
    from . import _cuda
except ImportError as exc:  # the default build: no CUDA toolkit was asked for
    _cuda = None
    _IMPORT_ERROR: Optional[str] = str(exc)
else:
    _IMPORT_ERROR = None

__all__ = ["attention", "info", "is_device_array"]

NOT_BUILT = "fusedattn was built without CUDA (reinstall with -Ccmake.define.FUSEDATTN_CUDA=ON)"
MAX_HEAD_DIM = 256  # cpp/cuda/kernel_params.h: kMaxHeadDim
_GPU_DTYPES = ("float32", "float16", "bfloat16")
_KDL_CPU, _KDL_CUDA = 1, 2
_LEGACY_DEFAULT_STREAM = 1  # the number __cuda_array_interface__ v3 and DLPack use for CUDA's stream 0


def _require_built():
    if _cuda is None:
        raise RuntimeError(NOT_BUILT)


def info() -> dict:
    """What the CUDA path has to work with: ``backend_info()["cuda"]``.

    Returns:
        ``{"built": bool, "devices": [{"index", "name", "compute_capability", "total_memory", ...}],
        "error": str or None}``; ``error`` says why there are no devices (no build, no driver, no GPU).

    Example:
        >>> import fusedattn as fa
        >>> sorted(fa.backend_info()["cuda"])
        ['built', 'devices', 'error']
    """
    if _cuda is None:
        return {"built": False, "devices": [], "error": NOT_BUILT}
    try:
        devices = [_cuda.device_info(i) for i in range(_cuda.device_count())]
    except RuntimeError as exc:  # no driver, no device: report it, the CPU path is unaffected
        return {"built": True, "devices": [], "error": str(exc)}
    return {"built": True, "devices": devices, "error": None if devices else "no CUDA device"}


# --- Describing arrays ---------------------------------------------------------------------------------

@dataclass
class DeviceArray:
    """An array as the kernel sees it: a pointer, shape, strides in elements and a dtype name."""

    ptr: int
    shape: tuple
    strides: tuple  # in elements
    dtype: str  # "float32", "float16", "bfloat16", "bool", or another name (refused later)
    itemsize: int
    device: Optional[int]  # CUDA ordinal; None until looked up (__cuda_array_interface__ has no device)
    on_cuda: bool
    stream: Optional[int] = None  # __cuda_array_interface__ v3: work on this stream must finish first
    readonly: bool = False
    kind: str = "cuda"  # "cupy", "torch" or "cuda": which library allocates results like it
    obj: Any = None
    keepalive: Any = field(default=None, repr=False)  # a DLPack capsule: its deleter runs when collected


def _library_kind(obj) -> str:
    module = type(obj).__module__ or ""
    return "cupy" if module.startswith("cupy") else "torch" if module.startswith("torch") else "cuda"


def _dtype_name(np_dtype: np.dtype) -> str:
    return "bool" if np_dtype == np.bool_ else np_dtype.name


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


def from_cuda_array_interface(obj, name: str) -> DeviceArray:
    """Read ``obj.__cuda_array_interface__`` (versions 2 and 3): pointer, shape, strides, dtype, stream.

    Raises ``ValueError`` / ``TypeError`` naming ``name`` for what the kernel cannot read (masked arrays,
    big-endian data, strides that are not whole elements, unknown type strings).
    """
    cai = obj.__cuda_array_interface__
    shape = tuple(int(n) for n in cai["shape"])
    try:
        np_dtype = np.dtype(cai["typestr"])
    except TypeError:
        raise TypeError(f"{name}: unsupported __cuda_array_interface__ typestr {cai['typestr']!r}") from None
    if np_dtype.byteorder == ">":
        raise ValueError(f"{name}: big-endian data ({cai['typestr']!r}) is not supported")
    if cai.get("mask") is not None:
        raise ValueError(f"{name}: masked __cuda_array_interface__ arrays (a 'mask' entry) are not supported")
    ptr, readonly = cai["data"]
    item = np_dtype.itemsize
    if cai.get("strides") is None:
        strides = _contiguous_strides(shape)
    else:
        byte_strides = tuple(int(s) for s in cai["strides"])
        if any(s % item for s in byte_strides):
            raise ValueError(f"{name}: strides {byte_strides} (bytes) are not multiples of the item size {item}")
        strides = tuple(s // item for s in byte_strides)
    stream = cai.get("stream") if int(cai.get("version", 2)) >= 3 else None
    return DeviceArray(int(ptr or 0), shape, strides, _dtype_name(np_dtype), item, None, True, stream, bool(readonly),
                       _library_kind(obj), obj)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):  # the unversioned capsule ("dltensor"), DLPack < 1.0 and >= 1.0
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
# (DLPack type code, bits) -> name; kDLFloat = 2, kDLBfloat = 4, kDLInt = 0, kDLUInt = 1, kDLBool = 6.
_DL_DTYPES = {(2, 32): "float32", (2, 16): "float16", (2, 64): "float64", (4, 16): "bfloat16", (6, 8): "bool",
              (1, 8): "uint8", (0, 8): "int8", (0, 32): "int32", (0, 64): "int64"}


def from_dlpack(obj, name: str, stream: Optional[int] = None) -> DeviceArray:
    """Read an array through ``obj.__dlpack__()`` without taking ownership.

    ``stream`` (CUDA only) is the stream the kernel will run on, so the producer orders its pending work
    before it (DLPack's contract). The capsule is kept in ``keepalive``: as it is never consumed, its
    destructor calls the producer's deleter once the call is over. Strides are in elements.
    """
    device_type, device_id = obj.__dlpack_device__()
    capsule = obj.__dlpack__(stream=stream) if int(device_type) == _KDL_CUDA else obj.__dlpack__()
    address = _capsule_pointer(capsule, b"dltensor")
    tensor = _DLManagedTensor.from_address(address).dl_tensor
    ndim = int(tensor.ndim)
    shape = tuple(int(tensor.shape[i]) for i in range(ndim))
    strides = (tuple(int(tensor.strides[i]) for i in range(ndim)) if tensor.strides
               else _contiguous_strides(shape))
    if tensor.dtype.lanes != 1:
        raise TypeError(f"{name}: vector DLPack dtypes (lanes={tensor.dtype.lanes}) are not supported")
    code, bits = int(tensor.dtype.code), int(tensor.dtype.bits)
    dtype = _DL_DTYPES.get((code, bits), f"DLPack type code {code} with {bits} bits")
    ptr = int(tensor.data or 0) + int(tensor.byte_offset)
    return DeviceArray(ptr, shape, strides, dtype, max(bits // 8, 1), int(device_id), int(device_type) == _KDL_CUDA,
                       None, False, _library_kind(obj), obj, capsule)


def _has_cuda_array_interface(x) -> bool:
    """torch tensors are read through DLPack: their __cuda_array_interface__ raises for bfloat16 and for
    tensors that require grad (KeyError / RuntimeError, which hasattr does not swallow)."""
    if _library_kind(x) == "torch":
        return False
    try:
        return hasattr(x, "__cuda_array_interface__")
    except Exception:
        return False


def is_device_array(x) -> bool:
    """True for arrays on a CUDA device: ``__cuda_array_interface__``, or DLPack device type kDLCUDA (2)."""
    if isinstance(x, np.ndarray):
        return False
    if _has_cuda_array_interface(x):
        return True
    dlpack_device = getattr(x, "__dlpack_device__", None)
    if dlpack_device is None:
        return False
    try:
        return int(dlpack_device()[0]) == _KDL_CUDA
    except Exception:  # a producer that cannot say: not ours to route
        return False


def parse_device(device) -> Optional[int]:
    """``"cuda"`` -> None (the arrays' device, or 0 for NumPy inputs); ``"cuda:N"`` -> N.

    torch.device objects are accepted through their string form. Raises ``ValueError`` otherwise.
    """
    text = device if isinstance(device, str) else str(device)
    match = re.fullmatch(r"cuda(?::(\d+))?", text.strip())
    if match is None:
        raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return None if match.group(1) is None else int(match.group(1))


def wants_cuda(device, *arrays) -> bool:
    """The routing rule of :func:`fusedattn.attention`: ``device="cuda[:N]"``, or CUDA arrays without device=."""
    if device is None:
        return any(is_device_array(x) for x in arrays)
    if isinstance(device, str) and device.strip() == "cpu":
        return False
    parse_device(device)  # refuses anything that is neither cpu nor cuda
    return True


# --- Layout ----------------------------------------------------------------------------------------------

def _insert_head(shape, strides, user_rank):
    """_spec.head_view on (shape, strides): the implicit head axis of (L, D) and (B, L, D) inputs."""
    shape, strides = list(shape), list(strides)
    axis = head_axis(user_rank)
    if axis is not None:
        shape.insert(axis, 1)
        strides.insert(axis, 0)
    return tuple(shape), tuple(strides)


def _broadcast(shape, strides, target):
    """Strides of ``shape`` broadcast to ``target`` (NumPy's rules): zero on every repeated axis."""
    pad = len(target) - len(shape)
    shape, strides = (1,) * pad + tuple(shape), (0,) * pad + tuple(strides)
    return tuple(0 if n == 1 and t != 1 else s for n, t, s in zip(shape, target, strides))


def _spec(ptr, shape, strides, user_rank):
    shape, strides = _insert_head(shape, strides, user_rank)
    return (int(ptr), [int(n) for n in shape], [int(s) for s in strides])


def _byte_range(a: DeviceArray):
    low = a.ptr + sum(s * (n - 1) for n, s in zip(a.shape, a.strides) if s < 0 and n > 0) * a.itemsize
    high = a.ptr + (sum(s * (n - 1) for n, s in zip(a.shape, a.strides) if s > 0 and n > 0) + 1) * a.itemsize
    return low, high


def _may_overlap(a: DeviceArray, b: DeviceArray) -> bool:
    if 0 in a.shape or 0 in b.shape:
        return False
    (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
    return a0 < b1 and b0 < a1


# --- The entry point ---------------------------------------------------------------------------------

def refusal(spec) -> Optional[str]:
    """Why the GPU cannot run ``spec`` (an option only the CPU path has), or None: the CUDA backend's
    ``supports`` (fusedattn._dispatch)."""
    if spec.entry != "attention":
        return f"{spec.entry}() runs on the CPU only (the CUDA path has attention() forward)"
    for option, unsupported in (("window", spec.user_args.get("window") is not None),
                                ("alibi_slopes", spec.alibi_slopes is not None), ("softcap", spec.softcap != 0),
                                ("dropout_p", spec.dropout_p != 0), ("sinks", spec.sinks is not None),
                                ("k_scale", spec.k_scale is not None)):
        if unsupported:
            what = "int8 k / v with k_scale= / v_scale=" if option == "k_scale" else f"{option}="
            return f"{what} is not supported on the CUDA path yet (it is on the CPU)"
    if spec.layout == "block_diagonal":
        return "BlockDiagonal masks (packed sequences) are not supported on the CUDA path yet"
    return None


def _check_gpu_dtype(dtype: str, what: str = "q, k and v"):
    if dtype not in _GPU_DTYPES:
        raise TypeError(f"unsupported dtype {dtype} for device='cuda': {what} must be float32, float16 or bfloat16")


def _check_head_dims(spec):
    for name, dim in (("D (last axis of q and k)", spec.q.shape[-1]), ("Dv (last axis of v)", spec.v.shape[-1])):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"{name} must be at most {MAX_HEAD_DIM} on the CUDA path, got {dim}")


def _device_count() -> int:
    try:
        count = _cuda.device_count()
    except RuntimeError as exc:
        raise RuntimeError(f"no CUDA device: {exc}") from None
    if count == 0:
        raise RuntimeError("no CUDA device")
    return count


def attention(q, k, v, *, device="cuda", mask=None, causal=False, scale=None, window=None, alibi_slopes=None,
              softcap=None, q_start=0, k_start=0, dropout_p=0.0, seed=None, return_lse=False, out=None,
              out_dtype=None, num_threads=None):
    """:func:`fusedattn.attention` on an NVIDIA GPU (reached through ``device=`` or CUDA arrays).

    Args:
        q, k, v: ``(..., Hq, Lq, D)``, ``(..., Hkv, Lk, D)``, ``(..., Hkv, Lk, Dv)``: NumPy arrays (copied
            to the device and back) or CUDA arrays (CuPy, torch, any ``__cuda_array_interface__`` or
            DLPack producer; read in place with their strides). float32, float16 or bfloat16; D, Dv <= 256.
        device: ``"cuda"`` (the arrays' device; device 0 for NumPy inputs) or ``"cuda:N"``.
        mask: bool (True = may attend) or float, broadcastable to ``(..., Hq, Lq, Lk)``; a CUDA array of
            q's kind, or a NumPy array (copied over). A float mask other than float32 is converted.
        causal, scale, q_start, k_start, return_lse, out, out_dtype: as in :func:`fusedattn.attention`;
            ``out`` is an array of q's kind. ``num_threads`` is validated and has no effect.
        window, alibi_slopes, softcap, dropout_p / seed: not supported here (``NotImplementedError``).

    Returns:
        ``out`` ``(..., Hq, Lq, Dv)`` (and ``lse`` ``(..., Hq, Lq)``, float32) of q's kind: NumPy for NumPy
        inputs, else a CuPy array / torch tensor on q's device, written on the current stream.

    Raises:
        RuntimeError: no CUDA build, or no device. ValueError: arrays on different devices, bad shapes.
        TypeError: unsupported dtype. NotImplementedError: an option only the CPU path has.

    Example:
        >>> import numpy as np, fusedattn as fa
        >>> q = k = v = np.random.rand(1, 4, 64, 32).astype(np.float32)
        >>> fa.attention(q, k, v, device="cuda").shape  # doctest: +SKIP
        (1, 4, 64, 32)
    """
    from . import api

    return api.attention(q, k, v, device=device, mask=mask, causal=causal, scale=scale, window=window,
                         alibi_slopes=alibi_slopes, softcap=softcap, q_start=q_start, k_start=k_start,
                         dropout_p=dropout_p, seed=seed, return_lse=return_lse, out=out, out_dtype=out_dtype,
                         num_threads=num_threads)


def run(spec):
    """The CUDA backend's run: a validated forward spec on the GPU (see fusedattn._dispatch)."""
    wanted = None if spec.device is None else parse_device(spec.device)
    if "numpy" in spec.device_arrays:
        return _attention_numpy(spec, wanted)
    return _attention_device(spec, wanted)


def _attention_numpy(spec, wanted):
    """NumPy in, NumPy out: copy the (compacted) inputs to the device, compute, copy the results back."""
    _check_gpu_dtype(spec.q.dtype.name)
    _check_head_dims(spec)
    resolved_out = spec.out_dtype
    out, return_lse = spec.out, spec.return_lse
    _require_built()
    count = _device_count()
    index = 0 if wanted is None else wanted
    if index >= count:
        raise ValueError(f"device='cuda:{index}' but only {count} CUDA device(s) are visible")
    result = np.empty(spec.out_shape, dtype=resolved_out)
    lse = np.empty(spec.lse_shape, dtype=np.float32) if return_lse else None
    allocations = []

    def empty(shape, dtype):
        ptr = _cuda.malloc(int(np.prod(shape)) * np.dtype(dtype).itemsize, index)
        allocations.append(ptr)
        return (ptr, [int(n) for n in shape], list(_contiguous_strides(shape)))

    try:
        q_spec, k_spec, v_spec = (_stage_host(x, index, allocations) for x in (spec.q, spec.k, spec.v))
        mask_spec = None if spec.mask is None else _stage_host(spec.mask, index, allocations)
        out_spec = empty(spec.q.shape[:-1] + (spec.v.shape[-1],), resolved_out)
        lse_spec = empty(spec.q.shape[:-1], np.float32) if return_lse else None
        _launch(spec, q_spec, k_spec, v_spec, mask_spec, out_spec, lse_spec, resolved_out, index, 0)
        # cudaMemcpy on the default stream waits for the kernel.
        _cuda.memcpy_dtoh(result.ctypes.data, out_spec[0], result.nbytes, index)
        if lse is not None:
            _cuda.memcpy_dtoh(lse.ctypes.data, lse_spec[0], lse.nbytes, index)
    finally:
        for ptr in allocations:
            _cuda.free(ptr, index)
    if out is not None:
        out[...] = result
        result = out
    return (result, lse) if return_lse else result


def _launch(spec, q_spec, k_spec, v_spec, mask_spec, out_spec, lse_spec, resolved_out, index, stream):
    _cuda.attention_forward(
        spec.q.dtype.name, q_spec, k_spec, v_spec, mask_spec,
        "none" if mask_spec is None else ("bool" if spec.mask.dtype == np.bool_ else "float"), out_spec, lse_spec,
        np.dtype(resolved_out) == np.float32 and is_half_dtype(spec.q.dtype), spec.scale,
        int(spec.diagonal_offset), spec.windowed, index, stream)


def _describe(x, name: str, stream: Optional[int] = None) -> DeviceArray:
    if _has_cuda_array_interface(x):
        try:
            return from_cuda_array_interface(x, name)
        except (TypeError, ValueError):
            if not hasattr(x, "__dlpack__"):
                raise
    if hasattr(x, "__dlpack__"):  # torch tensors (bfloat16 included, which __cuda_array_interface__ lacks)
        if _library_kind(x) == "torch" and getattr(x, "requires_grad", False):
            x = x.detach()
        return from_dlpack(x, name, stream)
    raise TypeError(f"{name} must be a NumPy array or a CUDA array (__cuda_array_interface__ or DLPack), "
                    f"got {type(x).__name__}")


def _dummy(a: DeviceArray):
    """A zero-stride NumPy stand-in with a's shape and dtype, so _spec can validate it."""
    if a.dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError("bfloat16 arrays need the ml_dtypes package (pip install ml_dtypes)") from None
        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        try:
            dtype = np.dtype(a.dtype)
        except TypeError:
            raise TypeError(f"unsupported dtype {a.dtype} for device='cuda'") from None
    return np.broadcast_to(np.zeros((), dtype), a.shape)


def _same_stream(a: int, b: int) -> bool:
    legacy = lambda s: 0 if s == _LEGACY_DEFAULT_STREAM else s  # noqa: E731 - 1 and 0 both name the legacy stream
    return legacy(a) == legacy(b)


def _torch_stream(q) -> int:
    import torch

    return int(torch.cuda.current_stream(q.device).cuda_stream)


def _launch_stream(kind: str, q, q_array: DeviceArray) -> int:
    """The stream the result is enqueued on: CuPy's / torch's current one, else q's interface stream."""
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(q_array.device):
            return int(cupy.cuda.get_current_stream().ptr)
    if kind == "torch":
        return _torch_stream(q)
    return 0 if q_array.stream is None or _same_stream(q_array.stream, 0) else int(q_array.stream)


def _allocate(kind: str, shape, dtype: str, device: int, like):
    if kind == "torch":
        import torch

        return torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=f"cuda:{device}")
    try:
        import cupy
    except ImportError:
        raise TypeError(f"cannot allocate a result like q ({type(like).__name__}) without CuPy: pass out= (an array "
                        f"with __cuda_array_interface__), or use CuPy or torch arrays") from None
    if dtype == "bfloat16":
        raise TypeError("CuPy has no bfloat16: use torch tensors for bfloat16 on the GPU")
    with cupy.cuda.Device(device):
        return cupy.empty(tuple(shape), dtype=dtype)


def _to_float32(mask):
    kind = _library_kind(mask)
    if kind == "cupy":
        return mask.astype("float32")
    if kind == "torch":
        import torch

        return mask.to(torch.float32)
    raise TypeError("mask: a float mask on the GPU must be float32 (CuPy and torch masks are converted for you)")


def _stage_host(x: np.ndarray, index: int, allocations: list):
    """Copy what a (possibly broadcast) NumPy view reads to the device; the spec keeps its zero strides."""
    pick = tuple(slice(0, 1) if s == 0 and n > 1 else slice(None) for n, s in zip(x.shape, x.strides))
    compact = np.ascontiguousarray(x[pick])
    ptr = _cuda.malloc(compact.nbytes, index)
    allocations.append(ptr)
    _cuda.memcpy_htod(ptr, compact.ctypes.data, compact.nbytes, index)
    strides = [0 if s == 0 and n > 1 else cs // x.itemsize for n, s, cs in zip(x.shape, x.strides, compact.strides)]
    return (ptr, [int(n) for n in x.shape], [int(s) for s in strides])


def _resolve_device(named: list, wanted: Optional[int], count: int) -> int:
    """The one device every array is on; ValueError naming the first two that differ."""
    for name, a in named:
        if a.device is None and a.ptr:  # __cuda_array_interface__ does not say: ask CUDA about the pointer
            a.device = _cuda.pointer_device(a.ptr)
        if a.device is not None and a.device < 0:
            raise ValueError(f"{name} is not in CUDA device memory (its pointer is host memory)")
    known = [(name, a.device) for name, a in named if a.device is not None]
    if not known:  # every array is empty (no pointer): nothing to read, any device will do
        known = [("the call", 0 if wanted is None else wanted)]
    index = known[0][1]
    for name, device in known[1:]:
        if device != index:
            raise ValueError(f"{known[0][0]} is on cuda:{index} but {name} on cuda:{device}")
    if wanted is not None and wanted != index:
        raise ValueError(f"device='cuda:{wanted}' but {known[0][0]} is on cuda:{index}")
    if index >= count:
        raise ValueError(f"cuda:{index} requested but only {count} CUDA device(s) are visible")
    return index


def stand_ins(q, k, v, mask):
    """CUDA q, k, v (and mask) described, dtype-checked and replaced by zero-stride NumPy stand-ins of their
    shapes and dtypes, so that _spec validates them exactly as it does NumPy arrays; returns
    ``((q, k, v, mask) stand-ins, what the launch needs)``."""
    names = ("q", "k", "v")
    for name, x in zip(names, (q, k, v)):
        if not is_device_array(x):
            raise ValueError(f"q, k and v must all be CUDA arrays or all NumPy arrays; {name} is a "
                             f"{type(x).__name__} on the host")
    kind = _library_kind(q)
    # torch exports through DLPack, which orders the producer's work before our stream for us.
    dl_stream = (_torch_stream(q) or _LEGACY_DEFAULT_STREAM) if kind == "torch" else None
    arrays = [_describe(x, name, dl_stream) for name, x in zip(names, (q, k, v))]
    for a in arrays:
        _check_gpu_dtype(a.dtype)
    mask_array, checked_mask = None, mask
    if mask is not None and is_device_array(mask):
        mask_array = _describe(mask, "mask", dl_stream)
        if mask_array.dtype in ("float16", "bfloat16", "float64"):
            mask_array = _describe(_to_float32(mask), "mask", dl_stream)
        elif mask_array.dtype not in ("bool", "float32"):
            raise TypeError(f"mask must be a bool array (True = may attend) or a float array (added to scores), "
                            f"got dtype {mask_array.dtype}")
        checked_mask = _dummy(mask_array)
    launch = {"q": q, "kind": kind, "dl_stream": dl_stream, "arrays": arrays, "mask_array": mask_array}
    return tuple(_dummy(a) for a in arrays) + (checked_mask,), launch


def _attention_device(spec, wanted):
    """CUDA arrays in place: launch on q's stream, return q's kind."""
    launch = spec.device_arrays
    q, kind, dl_stream, arrays, mask_array = (launch[name] for name in ("q", "kind", "dl_stream", "arrays",
                                                                        "mask_array"))
    names = ("q", "k", "v")
    _check_head_dims(spec)
    resolved_out = spec.out_dtype
    out, return_lse = spec.user_args["out"], spec.return_lse
    _require_built()
    count = _device_count()
    inputs = list(zip(names, arrays)) + ([("mask", mask_array)] if mask_array is not None else [])
    index = _resolve_device(inputs, wanted, count)
    stream = _launch_stream(kind, q, arrays[0])
    for name, a in inputs:  # __cuda_array_interface__ v3: work pending on another stream must finish first
        if a.stream is not None and not _same_stream(a.stream, stream):
            _cuda.stream_synchronize(int(a.stream), index)

    if out is None:
        out = _allocate(kind, spec.out_shape, resolved_out.name, index, q)
    out_array = _describe(out, "out", dl_stream)
    if tuple(out_array.shape) != tuple(spec.out_shape):
        raise ValueError(f"out must have shape {tuple(spec.out_shape)} (q's shape with v's last axis), got {out_array.shape}")
    if out_array.dtype != resolved_out.name:
        raise TypeError(f"out must have dtype {resolved_out.name} (the output's dtype), got {out_array.dtype}")
    if out_array.readonly:
        raise ValueError("out must be writeable, got a read-only array")
    _resolve_device([("q", arrays[0]), ("out", out_array)], None, count)
    for name, a in inputs:
        if _may_overlap(out_array, a):
            raise ValueError(f"out must not overlap {name}: the kernel reads {name} while writing out")
    lse = _allocate(kind, spec.lse_shape, "float32", index, q) if return_lse else None
    lse_array = _describe(lse, "lse", dl_stream) if return_lse else None

    rank = spec.user_rank
    scores_shape = tuple(spec.lse_shape) + (spec.k.shape[-2],)
    staged = []
    try:
        if spec.mask is None:
            mask_spec = None
        elif mask_array is not None:
            mask_spec = _spec(mask_array.ptr, scores_shape, _broadcast(mask_array.shape, mask_array.strides,
                                                                       scores_shape), rank)
        else:  # a NumPy mask with CUDA inputs: spec.mask is its prepared (kernel-layout) view
            mask_spec = _stage_host(spec.mask, index, staged)
        specs = [_spec(a.ptr, a.shape, a.strides, rank) for a in arrays]
        out_spec = _spec(out_array.ptr, out_array.shape, out_array.strides, rank)
        lse_spec = _spec(lse_array.ptr, lse_array.shape, lse_array.strides, rank) if return_lse else None
        _launch(spec, *specs, mask_spec, out_spec, lse_spec, resolved_out, index, stream)
    finally:
        for ptr in staged:  # cudaFree waits for the kernel that reads the staged mask
            _cuda.free(ptr, index)
    return (out, lse) if return_lse else out
