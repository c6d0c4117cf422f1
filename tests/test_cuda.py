"""The optional CUDA path (fusedattn.cuda, fusedattn._cuda).

Two halves:

* The Python layer, which runs everywhere (CI has no GPU): routing (``device=``, CUDA arrays without it),
  the errors without a CUDA build or device, options the GPU refuses by name, ``backend_info()["cuda"]``,
  and the parsing of ``__cuda_array_interface__`` and DLPack descriptions (fake objects and NumPy's own
  DLPack export stand in for device arrays).
* The kernel against the float64 reference: the CPU suite's matrix (shapes with Lq = 1, 7, 777 and D from
  8 to 256, bool / float masks with broadcasting, both causal alignments, GQA, float32 / float16 /
  bfloat16, non-contiguous strides, return_lse, fully masked rows, errors), through NumPy copies and,
  where installed, CuPy and torch arrays in place. Skipped, with the reason, where there is no CUDA
  build or no device.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import fusedattn as fa
from fusedattn import cuda, reference
from fusedattn._spec import head_view

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is in [test]
    BF16 = None

INFO = cuda.info()
GPU_REASON = (None if INFO["built"] and INFO["devices"] else
              f"no CUDA device to run on: {INFO['error']}")
gpu = pytest.mark.skipif(GPU_REASON is not None, reason=GPU_REASON or "")
no_gpu = pytest.mark.skipif(GPU_REASON is None, reason="a CUDA device is available: the no-device errors cannot occur")


def qkv(rng, lead=(2, 4), hkv=None, lq=16, lk=None, d=32, dv=None, dtype=np.float32):
    hq = lead[-1]
    lk = lq if lk is None else lk
    hkv = hq if hkv is None else hkv
    q = rng.standard_normal(lead + (lq, d)).astype(dtype)
    k = rng.standard_normal(lead[:-1] + (hkv, lk, d)).astype(dtype)
    v = rng.standard_normal(lead[:-1] + (hkv, lk, d if dv is None else dv)).astype(dtype)
    return q, k, v


class FakeCudaArray:
    """Just enough of a device array for the parsing and routing code: it points at host memory."""

    def __init__(self, array, version=3, stream=None, strides=True, mask=None):
        self.array = array  # keeps the memory alive
        cai = {"shape": array.shape, "typestr": array.dtype.str, "data": (array.ctypes.data, not array.flags.writeable),
               "version": version, "strides": array.strides if strides else None}
        if version >= 3:
            cai["stream"] = stream
        if mask is not None:
            cai["mask"] = mask
        self.__cuda_array_interface__ = cai


class FakeDLPackDevice:
    def __init__(self, device_type):
        self.device_type = device_type

    def __dlpack_device__(self):
        return (self.device_type, 0)


# --- backend_info and the errors without a build or device ----------------------------------------------

def test_backend_info_cuda_entry():
    entry = fa.backend_info()["cuda"]
    assert set(entry) == {"built", "devices", "error"}
    assert isinstance(entry["built"], bool)
    assert isinstance(entry["devices"], list)
    for device in entry["devices"]:
        assert {"index", "name", "compute_capability"} <= set(device)
        major, minor = device["compute_capability"].split(".")
        assert major.isdigit() and minor.isdigit()
    if not entry["built"]:
        assert entry["error"] == cuda.NOT_BUILT and entry["devices"] == []
    elif not entry["devices"]:
        assert isinstance(entry["error"], str) and entry["error"]  # CUDA's reason, not a crash
    else:
        assert entry["error"] is None


@no_gpu
def test_device_cuda_without_a_build_or_device_says_why(rng):
    q, k, v = qkv(rng)
    expected = "built without CUDA" if not INFO["built"] else "no CUDA device"
    with pytest.raises(RuntimeError, match=expected):
        fa.attention(q, k, v, device="cuda")
    with pytest.raises(RuntimeError, match=expected):
        fa.attention(FakeCudaArray(q), FakeCudaArray(k), FakeCudaArray(v))  # routed without device=


def test_not_built_message_names_the_reinstall_flag():
    assert "-Ccmake.define.FUSEDATTN_CUDA=ON" in cuda.NOT_BUILT


@pytest.mark.parametrize("device", ["cpu", None])
def test_cpu_device_is_the_cpu_path(rng, device):
    q, k, v = qkv(rng)
    np.testing.assert_array_equal(fa.attention(q, k, v, device=device, causal=True), fa.attention(q, k, v, causal=True))


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cuda0", 3])
def test_bad_device_is_a_value_error(rng, device):
    q, k, v = qkv(rng)
    with pytest.raises(ValueError, match="device must be None, 'cpu', 'cuda' or 'cuda:N'"):
        fa.attention(q, k, v, device=device)


@pytest.mark.parametrize("option, value, name", [
    ("window", (4, 0), "window"),
    ("alibi_slopes", np.ones(4, np.float32), "alibi_slopes"),
    ("softcap", 30.0, "softcap"),
    ("dropout_p", 0.1, "dropout_p"),
    ("mask", fa.masks.BlockDiagonal.from_seqlens([8, 8]), "BlockDiagonal"),
])
def test_unsupported_options_are_refused_by_name(rng, option, value, name):
    q, k, v = qkv(rng)
    with pytest.raises(NotImplementedError, match=name):
        fa.attention(q, k, v, device="cuda", **{option: value})
    with pytest.raises(NotImplementedError, match=name):
        fa.attention(FakeCudaArray(q), FakeCudaArray(k), FakeCudaArray(v), **{option: value})


def test_float64_is_refused_on_the_gpu(rng):
    q, k, v = qkv(rng, dtype=np.float64)
    with pytest.raises(TypeError, match="unsupported dtype float64 for device='cuda'"):
        fa.attention(q, k, v, device="cuda")
    with pytest.raises(TypeError, match="unsupported dtype float64"):
        fa.attention(FakeCudaArray(q), FakeCudaArray(k), FakeCudaArray(v))


def test_head_dim_above_256_is_refused(rng):
    q, k, v = qkv(rng, d=320)
    with pytest.raises(ValueError, match="at most 256 on the CUDA path, got 320"):
        fa.attention(q, k, v, device="cuda")


@pytest.mark.parametrize("bad", ["k_heads", "leading", "mask", "causal", "mixed_dtypes"])
def test_validation_errors_match_the_cpu_path(rng, bad):
    """The CUDA path runs _spec.prepare_attention: the same inputs give the same error, word for word."""
    q, k, v = qkv(rng)
    kwargs = {}
    if bad == "k_heads":
        k, v = k[:, :3], v[:, :3]
    elif bad == "leading":
        k, v = k[:1], v[:1]
    elif bad == "mask":
        kwargs["mask"] = np.ones((5, 16), bool)
    elif bad == "causal":
        kwargs["causal"] = "upper"
    elif bad == "mixed_dtypes":
        v = v.astype(np.float16)
    with pytest.raises((ValueError, TypeError)) as cpu_error:
        fa.attention(q, k, v, **kwargs)
    with pytest.raises(type(cpu_error.value)) as gpu_error:
        fa.attention(q, k, v, device="cuda", **kwargs)
    assert str(gpu_error.value) == str(cpu_error.value)
    with pytest.raises(type(cpu_error.value)) as fake_error:
        fa.attention(FakeCudaArray(q), FakeCudaArray(k), FakeCudaArray(v), **kwargs)
    assert str(fake_error.value) == str(cpu_error.value)


def test_cuda_and_host_arrays_do_not_mix(rng):
    q, k, v = qkv(rng)
    with pytest.raises(ValueError, match="all be CUDA arrays or all NumPy arrays; k is a ndarray on the host"):
        fa.attention(FakeCudaArray(q), k, FakeCudaArray(v))


# --- Routing and parsing ---------------------------------------------------------------------------------

def test_is_device_array(rng):
    q = rng.standard_normal((4, 8)).astype(np.float32)
    assert not cuda.is_device_array(q)
    assert cuda.is_device_array(FakeCudaArray(q))
    assert cuda.is_device_array(FakeDLPackDevice(2))
    assert not cuda.is_device_array(FakeDLPackDevice(1))
    assert not cuda.is_device_array([[1.0]])


@pytest.mark.parametrize("device, expected", [("cuda", None), ("cuda:0", 0), ("cuda:3", 3), (" cuda:12 ", 12)])
def test_parse_device(device, expected):
    assert cuda.parse_device(device) == expected


def test_wants_cuda(rng):
    q = rng.standard_normal((4, 8)).astype(np.float32)
    assert not cuda.wants_cuda(None, q, q, q)
    assert not cuda.wants_cuda("cpu", q, q, q)
    assert cuda.wants_cuda("cuda", q, q, q)
    assert cuda.wants_cuda(None, FakeCudaArray(q), q, q)


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "stepped", "reversed"])
def test_cuda_array_interface_parsing(rng, version, layout):
    base = rng.standard_normal((6, 10, 12)).astype(np.float32)
    view = {"contiguous": base, "transposed": base.swapaxes(0, 1), "stepped": base[::2, :, 1::3],
            "reversed": base[:, ::-1]}[layout]
    parsed = cuda.from_cuda_array_interface(FakeCudaArray(view, version=version, stream=7), "q")
    assert parsed.ptr == view.ctypes.data
    assert parsed.shape == view.shape
    assert parsed.strides == tuple(s // 4 for s in view.strides)
    assert parsed.dtype == "float32" and parsed.itemsize == 4 and parsed.on_cuda
    assert parsed.stream == (7 if version == 3 else None)
    assert parsed.device is None  # looked up from the pointer later


def test_cuda_array_interface_without_strides_is_c_contiguous(rng):
    x = rng.standard_normal((3, 5, 7)).astype(np.float16)
    parsed = cuda.from_cuda_array_interface(FakeCudaArray(x, strides=False), "k")
    assert parsed.strides == (35, 7, 1) and parsed.dtype == "float16"


def test_cuda_array_interface_refusals(rng):
    x = rng.standard_normal((4, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="q: masked __cuda_array_interface__"):
        cuda.from_cuda_array_interface(FakeCudaArray(x, mask=object()), "q")
    odd = FakeCudaArray(x)
    odd.__cuda_array_interface__["strides"] = (32, 2)
    with pytest.raises(ValueError, match="not multiples of the item size 4"):
        cuda.from_cuda_array_interface(odd, "v")
    big = FakeCudaArray(x)
    big.__cuda_array_interface__["typestr"] = ">f4"
    with pytest.raises(ValueError, match="big-endian"):
        cuda.from_cuda_array_interface(big, "k")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.bool_])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "stepped"])
def test_dlpack_parsing_with_numpy(rng, dtype, layout):
    """NumPy exports DLPack on the host: the same ctypes reader that reads torch's CUDA tensors."""
    if not hasattr(np.ndarray, "__dlpack__"):
        pytest.skip("this NumPy has no DLPack export")
    base = (rng.standard_normal((6, 10, 12)) > 0).astype(dtype)
    view = {"contiguous": base, "transposed": base.swapaxes(0, 2), "stepped": base[::2, 1:, ::3]}[layout]
    parsed = cuda.from_dlpack(view, "q")
    assert parsed.ptr == view.ctypes.data
    assert parsed.shape == view.shape
    assert parsed.strides == tuple(s // view.itemsize for s in view.strides)
    assert parsed.dtype == ("bool" if dtype == np.bool_ else np.dtype(dtype).name)
    assert not parsed.on_cuda and parsed.device == 0


def test_dlpack_capsule_is_released(rng):
    """The capsule is never consumed, so the producer's deleter runs when it is collected."""
    if not hasattr(np.ndarray, "__dlpack__"):
        pytest.skip("this NumPy has no DLPack export")
    import gc
    import sys

    x = rng.standard_normal((4, 8)).astype(np.float32)
    before = sys.getrefcount(x)
    parsed = cuda.from_dlpack(x, "q")
    assert sys.getrefcount(x) > before
    del parsed
    gc.collect()
    assert sys.getrefcount(x) == before


@pytest.mark.parametrize("shape, target", [
    ((7, 9), (2, 3, 7, 9)), ((1, 9), (2, 3, 7, 9)), ((3, 1, 9), (2, 3, 7, 9)), ((2, 1, 1, 1), (2, 3, 7, 9)),
    ((9,), (5, 7, 9)), ((2, 3, 7, 9), (2, 3, 7, 9)),
])
def test_broadcast_strides_match_numpy(rng, shape, target):
    x = rng.standard_normal(shape)[..., ::-1]
    got = cuda._broadcast(x.shape, tuple(s // 8 for s in x.strides), target)
    assert got == tuple(s // 8 for s in np.broadcast_to(x, target).strides)


@pytest.mark.parametrize("shape", [(5, 8), (3, 5, 8), (2, 3, 5, 8), (2, 2, 3, 5, 8)])
def test_head_insertion_matches_head_view(rng, shape):
    x = np.asfortranarray(rng.standard_normal(shape))
    spec = cuda._spec(x.ctypes.data, x.shape, tuple(s // 8 for s in x.strides), len(shape))
    view = head_view(x, len(shape))
    assert tuple(spec[1]) == view.shape
    strides = [s // 8 for s in view.strides]
    assert [s for n, s in zip(spec[1], spec[2]) if n > 1] == [s for n, s in zip(view.shape, strides) if n > 1]


def test_overlap_check_on_device_descriptions(rng):
    x = rng.standard_normal((4, 8)).astype(np.float32)
    a = cuda.from_cuda_array_interface(FakeCudaArray(x[:2]), "a")
    b = cuda.from_cuda_array_interface(FakeCudaArray(x[2:]), "b")
    c = cuda.from_cuda_array_interface(FakeCudaArray(x[1:3, ::-1]), "c")
    assert not cuda._may_overlap(a, b)
    assert cuda._may_overlap(a, c) and cuda._may_overlap(b, c)


# --- The kernel against the reference (needs a GPU) -------------------------------------------------------

def tolerance(dtype):
    """float32: the CPU suite's. 16-bit: two units in the last place of the stored output (the kernel
    accumulates exact products of 16-bit inputs in float32; the final rounding dominates)."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return dict(atol=2e-5, rtol=2e-5)
    eps = 2.0 ** -10 if dtype == np.float16 else 2.0 ** -7
    return dict(atol=2 * eps, rtol=2 * eps)


DTYPES = [np.float32, np.float16] + ([BF16] if BF16 is not None else [])
SHAPES = [  # (lead, hkv, lq, lk, d, dv)
    ((1, 1), 1, 1, 1, 8, 8),
    ((2, 4), 4, 7, 13, 16, 16),
    ((1, 8), 2, 1, 777, 64, 64),       # decode, GQA
    ((2, 4), 1, 777, 333, 40, 24),     # MQA, Dv != D
    ((1, 2), 2, 130, 130, 128, 128),
    ((1, 2), 2, 65, 200, 80, 96),
    ((1, 2), 1, 33, 70, 200, 256),
    ((1, 1), 1, 70, 64, 256, 256),
    ((3,), 3, 17, 31, 32, 32),          # (B, L, D)-style heads only
]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_attention_matches_reference(rng, dtype, shape, causal):
    lead, hkv, lq, lk, d, dv = shape
    q, k, v = qkv(rng, lead, hkv, lq, lk, d, dv, dtype)
    out, lse = fa.attention(q, k, v, causal=causal, device="cuda", return_lse=True)
    ref, ref_lse = reference.attention(q, k, v, causal=causal, return_lse=True)
    assert out.dtype == q.dtype and lse.dtype == np.float32
    np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), **tolerance(dtype))
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5, rtol=1e-5)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mask_shape", [(16, 24), (4, 1, 24), (2, 4, 16, 24), (1, 24), (2, 1, 16, 1)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_with_broadcasting(rng, dtype, mask_shape, kind):
    q, k, v = qkv(rng, (2, 4), 2, 16, 24, 32, dtype=dtype)
    if kind == "bool":
        mask = rng.random(mask_shape) > 0.3
    else:
        mask = np.where(rng.random(mask_shape) > 0.3, rng.standard_normal(mask_shape), -np.inf).astype(np.float32)
    for causal in (False, "bottom_right"):
        out = fa.attention(q, k, v, mask=mask, causal=causal, device="cuda")
        ref = reference.attention(q, k, v, mask=mask, causal=causal)
        np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), **tolerance(dtype))


@gpu
def test_fully_masked_rows_are_zero_with_minus_inf_lse(rng):
    q, k, v = qkv(rng, (1, 2), 2, 9, 12, 16)
    mask = np.ones((9, 12), bool)
    mask[[0, 4, 8]] = False
    out, lse = fa.attention(q, k, v, mask=mask, device="cuda", return_lse=True)
    assert np.all(out[:, :, [0, 4, 8]] == 0) and np.all(lse[:, :, [0, 4, 8]] == -np.inf)
    np.testing.assert_allclose(out, reference.attention(q, k, v, mask=mask), **tolerance(np.float32))
    # Top-left causal with more queries than keys shifted away: rows before the first key see nothing.
    out, lse = fa.attention(q, k, v, causal=True, k_start=3, device="cuda", return_lse=True)
    ref, ref_lse = reference.attention(q, k, v, causal=True, k_start=3, return_lse=True)
    np.testing.assert_allclose(out, ref, **tolerance(np.float32))
    np.testing.assert_array_equal(lse == -np.inf, ref_lse == -np.inf)


@gpu
@pytest.mark.parametrize("q_start, k_start", [(0, 0), (5, 0), (0, 4), (40, 17)])
def test_chunk_positions(rng, q_start, k_start):
    q, k, v = qkv(rng, (1, 2), 2, 20, 33, 32)
    for causal in (True, "bottom_right"):
        out = fa.attention(q, k, v, causal=causal, q_start=q_start, k_start=k_start, device="cuda")
        ref = reference.attention(q, k, v, causal=causal, q_start=q_start, k_start=k_start)
        np.testing.assert_allclose(out, ref, **tolerance(np.float32))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_strided_layouts_and_low_ranks(rng, dtype):
    q, k, v = qkv(rng, (2, 4), 2, 33, 47, 64, dtype=dtype)
    layouts = [
        (q.swapaxes(1, 2).copy().swapaxes(1, 2), k, v),                  # (B, L, H, D) storage
        (q[:, :, ::-1], k[:, :, ::2], v[:, :, ::2]),                       # reversed and stepped rows
        (q[..., :48], k[..., 16:], v),                                     # column slices
        (np.asfortranarray(q), np.asfortranarray(k), np.asfortranarray(v)),
        (q[0, 0], k[0, 0], v[0, 0]),                                       # (L, D)
        (q[0], k[0, :1].repeat(4, 0), v[0, :1].repeat(4, 0)),              # (B, L, D)
    ]
    for lq_, lk_, lv_ in layouts:
        out = fa.attention(lq_, lk_, lv_, causal="bottom_right", device="cuda")
        ref = reference.attention(lq_, lk_, lv_, causal="bottom_right")
        np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), **tolerance(dtype))


@gpu
def test_out_out_dtype_and_scale(rng):
    q, k, v = qkv(rng, (2, 2), 2, 10, 12, 16, dtype=np.float16)
    out = np.empty((2, 2, 10, 16), np.float32)
    got = fa.attention(q, k, v, scale=0.3, out=out, out_dtype=np.float32, device="cuda")
    assert got is out
    ref = reference.attention(q, k, v, scale=0.3, out_dtype=np.float32)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@gpu
def test_empty_keys_and_queries(rng):
    q, k, v = qkv(rng, (1, 2), 2, 5, 0, 8)
    out, lse = fa.attention(q, k, v, device="cuda", return_lse=True)
    assert np.all(out == 0) and np.all(lse == -np.inf)
    q, k, v = qkv(rng, (1, 2), 2, 0, 5, 8)
    assert fa.attention(q, k, v, device="cuda").shape == (1, 2, 0, 8)


@gpu
def test_device_index_errors(rng):
    q, k, v = qkv(rng)
    with pytest.raises(ValueError, match="CUDA device"):
        fa.attention(q, k, v, device=f"cuda:{len(INFO['devices'])}")


@gpu
def test_cupy_arrays_in_place(rng):
    cp = pytest.importorskip("cupy")
    q, k, v = qkv(rng, (2, 4), 2, 40, 50, 64)
    mask = rng.random((40, 50)) > 0.2
    dq, dk, dv = (cp.asarray(x) for x in (q, k, v))
    out, lse = fa.attention(dq.swapaxes(1, 2).copy().swapaxes(1, 2), dk, dv, mask=cp.asarray(mask), causal=True,
                            return_lse=True)
    assert isinstance(out, cp.ndarray) and out.device == dq.device
    ref, ref_lse = reference.attention(q, k, v, mask=mask, causal=True, return_lse=True)
    np.testing.assert_allclose(cp.asnumpy(out), ref, **tolerance(np.float32))
    np.testing.assert_allclose(cp.asnumpy(lse), ref_lse, atol=1e-5, rtol=1e-5)
    # a NumPy mask with CuPy inputs is copied over
    out = fa.attention(dq, dk, dv, mask=mask)
    np.testing.assert_allclose(cp.asnumpy(out), reference.attention(q, k, v, mask=mask), **tolerance(np.float32))


@gpu
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
def test_torch_tensors_in_place(rng, dtype_name):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    q, k, v = qkv(rng, (2, 8), 2, 33, 65, 64)
    tq, tk, tv = (torch.from_numpy(x).to("cuda", getattr(torch, dtype_name)) for x in (q, k, v))
    out = fa.attention(tq, tk, tv, causal="bottom_right")
    assert isinstance(out, torch.Tensor) and out.device == tq.device and out.dtype == tq.dtype
    expected = reference.attention(*(x.float().cpu().numpy() for x in (tq, tk, tv)), causal="bottom_right")
    np.testing.assert_allclose(out.float().cpu().numpy(), expected,
                               **tolerance({"float32": np.float32, "float16": np.float16}.get(dtype_name, BF16)))


def test_library_kind_and_dlpack_abi():
    class Fake:
        pass

    Fake.__module__ = "cupy._core.core"
    assert cuda._library_kind(Fake()) == "cupy"
    Fake.__module__ = "torch"
    assert cuda._library_kind(Fake()) == "torch"
    assert ctypes.sizeof(cuda._DLTensor) == 48  # the DLPack ABI the reader assumes (64-bit)


# --- What the Python layer hands the C++ module, checked against a host emulation of _cuda ------------

class HostEmulatedCuda:
    """fusedattn._cuda's interface over host memory, its kernel a float64 NumPy re-statement.

    It reads every tensor *only* through the (pointer, shape, strides) triples the Python layer builds, so
    a wrong stride, a missing head axis, a lost broadcast or a wrong flag shows up as a wrong result.
    This checks the marshalling on any machine; the CUDA kernel itself needs a GPU (the tests above).
    """

    DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BF16}

    def __init__(self):
        self.buffers, self.calls, self.synchronized = {}, [], []

    def device_count(self):
        return 1

    def device_info(self, index):
        return {"index": index, "name": "host emulation", "compute_capability": "0.0"}

    def pointer_device(self, pointer):
        return 0

    def malloc(self, nbytes, device):
        buffer = np.zeros(max(nbytes, 1), np.uint8)
        self.buffers[buffer.ctypes.data] = buffer
        return buffer.ctypes.data

    def free(self, pointer, device):
        del self.buffers[pointer]

    def memcpy_htod(self, dst, src, nbytes, device):
        ctypes.memmove(dst, src, nbytes)

    memcpy_dtoh = memcpy_htod

    def stream_synchronize(self, stream, device):
        self.synchronized.append(stream)

    @staticmethod
    def view(spec, dtype):
        pointer, shape, strides = spec
        if 0 in shape:
            return np.zeros(shape, dtype)
        low = sum(s * (n - 1) for n, s in zip(shape, strides) if s < 0)
        high = sum(s * (n - 1) for n, s in zip(shape, strides) if s > 0)
        count = high - low + 1
        raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(pointer + low * dtype.itemsize)
        flat = np.frombuffer(raw, dtype=dtype)
        return np.lib.stride_tricks.as_strided(flat[-low:], shape, [s * dtype.itemsize for s in strides])

    def attention_forward(self, dtype, q, k, v, mask, mask_kind, out, lse, out_float32, scale, diagonal_offset,
                          causal, device, stream):
        self.calls.append(dict(dtype=dtype, mask_kind=mask_kind, out_float32=out_float32, causal=causal,
                               diagonal_offset=diagonal_offset, device=device, stream=stream))
        t = self.DTYPES[dtype]
        qf, kf, vf = (self.view(x, t).astype(np.float64) for x in (q, k, v))
        group = qf.shape[-3] // kf.shape[-3]
        kf, vf = np.repeat(kf, group, axis=-3), np.repeat(vf, group, axis=-3)
        scores = qf @ np.swapaxes(kf, -1, -2) * scale
        lq, lk = scores.shape[-2:]
        visible = np.ones(scores.shape, bool)
        if causal:
            visible &= np.arange(lk)[None, :] <= np.arange(lq)[:, None] + diagonal_offset
        if mask_kind == "bool":
            visible &= self.view(mask, np.dtype(np.bool_))
        elif mask_kind == "float":
            scores = scores + self.view(mask, np.dtype(np.float32))
        scores = np.where(visible, scores, -np.inf)
        peak = scores.max(-1, keepdims=True, initial=-np.inf)
        weights = np.exp(scores - np.where(np.isfinite(peak), peak, 0))
        total = weights.sum(-1, keepdims=True)
        result = np.where(total > 0, weights @ vf / np.where(total > 0, total, 1), 0)
        self.view(out, np.dtype(np.float32) if out_float32 else t)[...] = result
        if lse is not None:
            with np.errstate(divide="ignore"):
                self.view(lse, np.dtype(np.float32))[...] = (np.log(total) + peak)[..., 0]


@pytest.fixture
def emulated(monkeypatch):
    fake = HostEmulatedCuda()
    monkeypatch.setattr(cuda, "_cuda", fake)
    # Results "like q" for the fake device arrays: fake device arrays over fresh host memory.
    monkeypatch.setattr(cuda, "_allocate", lambda kind, shape, dtype, device, like: FakeCudaArray(
        np.zeros(shape, HostEmulatedCuda.DTYPES[dtype])))
    return fake


def host(x):
    return x.array if isinstance(x, FakeCudaArray) else x


EMULATED_CASES = [  # (description, q/k/v maker, kwargs)
    ("gqa causal", lambda r: qkv(r, (2, 4), 2, 9, 13, 8), dict(causal=True)),
    ("bottom right lse", lambda r: qkv(r, (2, 4), 1, 9, 13, 8, 6), dict(causal="bottom_right", return_lse=True)),
    ("2-D chunk", lambda r: tuple(x[0, 0] for x in qkv(r, (1, 1), 1, 7, 11, 5)), dict(causal=True, q_start=3, k_start=2)),
    ("3-D bool mask", lambda r: tuple(x[0] for x in qkv(r, (1, 3), 3, 6, 10, 4)), dict(mask="bool (1, 10)")),
    ("float mask heads", lambda r: qkv(r, (2, 3), 3, 5, 7, 4), dict(mask="float (3, 1, 7)", return_lse=True)),
    ("strided", lambda r: tuple(x.swapaxes(-2, -3).copy().swapaxes(-2, -3)[..., ::-1, :] for x in qkv(r, (2, 2), 2, 6, 6, 4)),
     dict(mask="bool (2, 1, 6, 6)")),
    ("fully masked", lambda r: qkv(r, (1, 2), 2, 4, 5, 3), dict(mask="none-visible", return_lse=True)),
    ("float16 out float32", lambda r: qkv(r, (1, 2), 2, 5, 6, 4, dtype=np.float16), dict(out_dtype=np.float32)),
]


def emulated_inputs(rng, make, kwargs):
    q, k, v = make(rng)
    kwargs = dict(kwargs)
    spec = kwargs.get("mask")
    if isinstance(spec, str):
        lq, lk = q.shape[-2], k.shape[-2]
        if spec == "none-visible":
            mask = np.ones((lq, lk), bool)
            mask[1] = False
        else:
            kind, shape = spec.split(" ", 1)
            shape = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
            mask = rng.random(shape) > 0.3 if kind == "bool" else rng.standard_normal(shape).astype(np.float32)
        kwargs["mask"] = mask
    return q, k, v, kwargs


def check_against_reference(got, q, k, v, kwargs):
    expected = reference.attention(q, k, v, **kwargs)
    if kwargs.get("return_lse"):
        (out, lse), (ref, ref_lse) = got, expected
        np.testing.assert_allclose(host(lse), ref_lse, atol=1e-5, rtol=1e-5)
    else:
        out, ref = got, expected
    assert host(out).shape == ref.shape and host(out).dtype == ref.dtype
    np.testing.assert_allclose(host(out).astype(np.float64), ref.astype(np.float64), **tolerance(q.dtype))


@pytest.mark.parametrize("case", EMULATED_CASES, ids=[c[0] for c in EMULATED_CASES])
def test_numpy_path_marshalling(emulated, rng, case):
    _, make, kwargs = case
    q, k, v, kwargs = emulated_inputs(rng, make, kwargs)
    check_against_reference(fa.attention(q, k, v, device="cuda", **kwargs), q, k, v, kwargs)
    assert not emulated.buffers, "every device buffer is freed"
    assert emulated.calls[-1]["stream"] == 0


@pytest.mark.parametrize("case", EMULATED_CASES, ids=[c[0] for c in EMULATED_CASES])
def test_device_array_path_marshalling(emulated, rng, case):
    _, make, kwargs = case
    q, k, v, kwargs = emulated_inputs(rng, make, kwargs)
    device_kwargs = dict(kwargs)
    if "mask" in kwargs and kwargs["mask"].dtype == np.bool_:
        device_kwargs["mask"] = FakeCudaArray(kwargs["mask"])  # float masks stay NumPy: copied over
    got = fa.attention(FakeCudaArray(q, stream=5), FakeCudaArray(k, stream=5), FakeCudaArray(v), **device_kwargs)
    check_against_reference(got, q, k, v, kwargs)
    assert emulated.calls[-1]["stream"] == 5  # q's stream (__cuda_array_interface__ v3)
    assert not emulated.buffers


def test_device_path_out_and_streams(emulated, rng):
    q, k, v = qkv(rng, (1, 2), 2, 5, 6, 4)
    out = FakeCudaArray(np.zeros((1, 2, 5, 4), np.float32))
    got = fa.attention(FakeCudaArray(q), FakeCudaArray(k, stream=9), FakeCudaArray(v, stream=1), out=out, causal=True)
    assert got is out
    np.testing.assert_allclose(out.array, reference.attention(q, k, v, causal=True), **tolerance(np.float32))
    assert emulated.synchronized == [9]  # k's producer stream; 1 is the legacy default stream q runs on
    with pytest.raises(ValueError, match="out must not overlap q"):
        fa.attention(FakeCudaArray(q), FakeCudaArray(k), FakeCudaArray(v), out=FakeCudaArray(q))
    with pytest.raises(TypeError, match="out must have dtype float32"):
        fa.attention(FakeCudaArray(q), FakeCudaArray(k), FakeCudaArray(v),
                     out=FakeCudaArray(np.zeros((1, 2, 5, 4), np.float16)))


def test_device_path_refuses_mixed_devices(emulated, rng, monkeypatch):
    q, k, v = qkv(rng, (1, 2), 2, 5, 6, 4)
    fq, fk, fv = FakeCudaArray(q), FakeCudaArray(k), FakeCudaArray(v)
    monkeypatch.setattr(emulated, "device_count", lambda: 2)
    monkeypatch.setattr(emulated, "pointer_device", lambda ptr: 1 if ptr == k.ctypes.data else 0)
    with pytest.raises(ValueError, match="q is on cuda:0 but k on cuda:1"):
        fa.attention(fq, fk, fv)
    monkeypatch.setattr(emulated, "pointer_device", lambda ptr: 1)
    with pytest.raises(ValueError, match="device='cuda:0' but q is on cuda:1"):
        fa.attention(fq, fk, fv, device="cuda:0")
    monkeypatch.setattr(emulated, "pointer_device", lambda ptr: -1)
    with pytest.raises(ValueError, match="q is not in CUDA device memory"):
        fa.attention(fq, fk, fv)


def test_torch_tensors_are_read_through_dlpack(rng):
    """torch's own __cuda_array_interface__ cannot describe bfloat16 or tensors that require grad."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((3, 4, 5)).astype(np.float32))
    assert not cuda.is_device_array(x)  # a CPU tensor stays on the CPU path
    for tensor, name in ((x.to(torch.bfloat16), "bfloat16"), (x.transpose(0, 2), "float32"),
                         (x.clone().requires_grad_(), "float32")):
        parsed = cuda._describe(tensor, "q")
        assert parsed.kind == "torch" and parsed.dtype == name and not parsed.on_cuda
        assert parsed.ptr == tensor.data_ptr()
        assert parsed.shape == tuple(tensor.shape) and parsed.strides == tuple(tensor.stride())


@pytest.mark.parametrize("entry", ["attention_backward", "attention_weights", "attention_varlen", "additive_attention"])
def test_cpu_only_entry_points_refuse_cuda_arrays_by_the_backend_table(rng, entry):
    """Only attention() forward has a GPU path: CUDA arrays elsewhere get every backend's reason."""
    q, k, v = qkv(rng)
    fq, fk, fv = (FakeCudaArray(x) for x in (q, k, v))
    calls = {
        "attention_backward": lambda: fa.attention_backward(fq, fq, fk, fv, fq, FakeCudaArray(q[..., 0])),
        "attention_weights": lambda: fa.attention_weights(fq, fk),
        "attention_varlen": lambda: fa.attention_varlen(FakeCudaArray(q[0]), FakeCudaArray(k[0]), FakeCudaArray(v[0]),
                                                        np.array([0, 4]), np.array([0, 4])),
        "additive_attention": lambda: fa.additive_attention(fq, fk, fv),
    }
    with pytest.raises(NotImplementedError, match=rf"{entry}\(\) runs on the CPU only") as error:
        calls[entry]()
    assert "cpu:" in str(error.value) and "reference:" in str(error.value)
