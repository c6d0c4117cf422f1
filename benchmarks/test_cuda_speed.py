"""Speed of the optional CUDA path (issue 9): fusedattn on the GPU vs torch's CUDA scaled_dot_product_attention.

Skipped, with the reason, where fusedattn was built without CUDA, no GPU is visible or torch has no CUDA.
NOT YET RUN ON A GPU (none was reachable when it was written): treat its first run as the verification.

On the anchor shapes of ``fusedattn bench`` and in float16, bfloat16 and float32, three rows per case:

* ``torch``: ``scaled_dot_product_attention`` on CUDA tensors; for 16-bit the flash backend is forced
  (``torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)``), float32 gets torch's own choice (flash
  has no float32 kernel). The issue's targets: fusedattn >= 0.8x torch's flash in 16 bits, >= 1x in float32.
* ``fusedattn``: the same torch tensors, read in place through DLPack (a torch result on the same stream).
* ``fusedattn-numpy``: NumPy arrays with ``device="cuda"``: copied to the GPU, computed, copied back.
  ``extra_info["copy_ms"]`` is its best time minus the in-place row's: the cost of the two copies.

Every timed call ends with ``torch.cuda.synchronize()`` so that the kernel, not its launch, is timed.
``extra_info``: ``ms``, ``tflops`` (4*B*H*Lq*Lk*D, halved for causal), and ``speedup_vs_torch`` (torch's
best / this row's, same session). Run with::

    python -m pytest benchmarks/test_cuda_speed.py --benchmark-only -q
"""
import contextlib

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark: pip install fusedattn[bench]")

import fusedattn  # noqa: E402
from fusedattn import _bench, cuda  # noqa: E402

# Causal shapes are square (lq == lk), where torch's top-left is_causal equals fusedattn's bottom-right.
SHAPES = (_bench.Shape(1, 8, 2048, 2048, 64), _bench.Shape(1, 8, 2048, 2048, 64, causal=True),
          _bench.Shape(1, 8, 2048, 2048, 128), _bench.Shape(4, 16, 256, 256, 64), _bench.Shape(1, 32, 1, 8192, 128))
DTYPES = ("float16", "bfloat16", "float32")
LIBRARIES = ("torch", "fusedattn", "fusedattn-numpy")  # torch first: the ratios need its time


def _gpu_reason(torch):
    built = cuda.info()
    if not built["built"]:
        return "fusedattn was built without CUDA (pip install . -Ccmake.define.FUSEDATTN_CUDA=ON)"
    if not built["devices"]:
        return f"no CUDA device visible to fusedattn: {built['error']}"
    if torch is None or not torch.cuda.is_available():
        return "torch with CUDA is needed for the comparison and the in-place tensors"
    return None


def _numpy_dtype(name):
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes: pip install ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _runner(library, torch, shape, host, device_tensors):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    causal = "bottom_right" if shape.causal else False
    tq, tk, tv = device_tensors

    if library == "fusedattn":
        def run():
            fusedattn.attention(tq, tk, tv, causal=causal)
            torch.cuda.synchronize()
    elif library == "fusedattn-numpy":
        q, k, v = host

        def run():
            fusedattn.attention(q, k, v, causal=causal, device="cuda")  # returns after the copy back
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def backend():  # a fresh context per call: sdpa_kernel is a one-shot context manager
            return sdpa_kernel(SDPBackend.FLASH_ATTENTION) if tq.dtype != torch.float32 else contextlib.nullcontext()

        def run():
            with torch.inference_mode(), backend():
                sdpa(tq, tk, tv, is_causal=shape.causal)
            torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label)
def test_cuda_speed(benchmark, shape, dtype_name, library, torch_module, best_s):
    """Time one row on one shape and dtype; record ms, TFLOP/s, the ratio to torch and the copy cost."""
    torch, torch_reason = torch_module
    reason = _gpu_reason(torch)
    if reason:
        pytest.skip(reason)
    host = tuple(x.astype(_numpy_dtype(dtype_name)) for x in _bench.make_inputs(shape, np.float32))
    device_tensors = tuple(torch.from_numpy(x.astype(np.float32)).to("cuda", getattr(torch, dtype_name)) for x in host)
    run = _runner(library, torch, shape, host, device_tensors)

    key = (shape.label, dtype_name)
    benchmark.group = f"cuda-{shape.label}-{dtype_name}"
    benchmark.extra_info.update(library=library, shape=shape.label, dtype=dtype_name,
                                gflop=_bench.attention_flops(shape) / 1e9, device=cuda.info()["devices"][0]["name"])
    seconds = _bench.run_benchmark(benchmark, run, target_s=0.5, min_reps=10)
    if seconds is None:  # --benchmark-disable: one untimed call
        return
    best_s[key, library] = seconds
    benchmark.extra_info.update(ms=seconds * 1e3, tflops=_bench.gflops(shape, seconds) / 1e3)
    if library != "torch" and (key, "torch") in best_s:
        benchmark.extra_info["speedup_vs_torch"] = best_s[key, "torch"] / seconds
    if library == "fusedattn-numpy" and (key, "fusedattn") in best_s:
        benchmark.extra_info["copy_ms"] = (seconds - best_s[key, "fusedattn"]) * 1e3
