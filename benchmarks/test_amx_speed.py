"""Speed on the matrix-unit rows of issue #13: fusedattn vs torch (and onnxruntime for float32), same process.

The rows the issue sets targets on, run on whatever machine this is; ``extra_info["isa"]`` says which
fusedattn level ran (``amx`` only on a CPU with AMX tiles granted by the OS: elsewhere bfloat16 runs on
avx512bf16, float16 on avx512, and float32 ``precision="high"`` runs as ``"highest"``):

* bfloat16 prefill (torch bfloat16 SDPA; on an AMX Xeon torch runs oneDNN brgemm on the tiles);
* float16 prefill (torch float16 SDPA);
* float32 ``precision="high"`` (bf16x3 on the tiles) and ``"highest"`` against the best of torch and
  onnxruntime float32 (onnxruntime's ``com.microsoft.MultiHeadAttention``, needs ``pip install onnx
  onnxruntime``; skipped without them), on the float32 anchor rows;
* bfloat16 forward + backward (``attention_vjp`` then its backward; torch autograd on bfloat16 leaves).

Rows: 1x8x2048x2048 with D = 64 and 128, the causal 2048^2 D = 64 row, and 4x16x256x256x64. Each library
gets the same thread count (``--attn-threads N``); the best of several rounds counts. Run with::

    python -m pytest benchmarks/test_amx_speed.py --benchmark-only --attn-threads 2 -q

``extra_info``: ``isa``, ``ms``, ``gflops`` (``4*B*H*Lq*Lk*D / time``, halved for causal; forward +
backward counts 3.5x that), and for fusedattn ``speedup_vs_torch`` (torch's best time / fusedattn's) and,
on float32 rows, ``speedup_vs_best_fp32`` (the faster of torch and onnxruntime / fusedattn). Before timing
each fusedattn result is checked against torch's.
"""

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark: pip install fusedattn[bench]")
ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes: pip install ml_dtypes")

import fusedattn  # noqa: E402  (after the skips: without the plugin there is nothing to run)
from fusedattn import _bench  # noqa: E402

ROWS = (_bench.Shape(1, 8, 2048, 2048, 64), _bench.Shape(1, 8, 2048, 2048, 128),
        _bench.Shape(1, 8, 2048, 2048, 64, causal=True), _bench.Shape(4, 16, 256, 256, 64))
FP32_ROWS = ROWS[:2]
BF16 = np.dtype(ml_dtypes.bfloat16)

# (row, dtype name, library): torch (and onnxruntime) first, fusedattn after: its ratios need their times.
FORWARD = ([(row, name, library) for name in ("bfloat16", "float16") for row in ROWS
            for library in ("torch", "fusedattn")] +
           [(row, "float32", library) for row in FP32_ROWS
            for library in ("torch", "onnxruntime", "fusedattn", "fusedattn-high")])
BACKWARD = [(row, "bfloat16", library) for row in ROWS for library in ("torch", "fusedattn")]

# 16-bit outputs differ from torch's by a few output roundings (both accumulate in float32; both round P to
# the input dtype, except fusedattn's exact float16 split): 8 eps of the dtype relative to max|out|.
# float32 "high" keeps ~16 bits per operand (tests/test_amx.py): 1e-4. Gradients: 16 eps of bfloat16.
CHECK = {"bfloat16": 8 * 2.0 ** -7, "float16": 8 * 2.0 ** -10, "float32": 1e-4}


def _inputs(row, dtype):
    return tuple(x.astype(dtype) for x in _bench.make_inputs(row, np.float32))


def _torch_tensor(torch, x, requires_grad=False):
    # torch cannot read ml_dtypes arrays: through float32, which holds every 16-bit value exactly.
    dtype = {BF16: torch.bfloat16, np.dtype(np.float16): torch.float16}.get(x.dtype, torch.float32)
    return torch.from_numpy(x.astype(np.float32)).to(dtype).requires_grad_(requires_grad)


def _onnxruntime_runner(row, q, k, v, threads):
    """onnxruntime's com.microsoft MultiHeadAttention: the one implementation of fusedattn bench (_bench)."""
    ort, reason = _bench.load_onnxruntime()
    if ort is None:
        pytest.skip(reason)
    return _bench.onnxruntime_runner(q, k, v, causal=row.causal, threads=threads)


def _forward_runner(library, row, q, k, v, threads, torch):
    if library.startswith("fusedattn"):
        precision = "high" if library == "fusedattn-high" else "highest"
        return lambda: fusedattn.attention(q, k, v, causal=row.causal, precision=precision, num_threads=threads)
    if library == "onnxruntime":
        return _onnxruntime_runner(row, q, k, v, threads)
    tq, tk, tv = (_torch_tensor(torch, x) for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run():
        with torch.inference_mode():
            return sdpa(tq, tk, tv, is_causal=row.causal)

    return run


def _as_float(x):
    return np.asarray(x.float().numpy() if hasattr(x, "float") else x, np.float64)


def _record(benchmark, best_s, key, library, seconds, flop):
    best_s[key, library] = seconds
    benchmark.extra_info.update(ms=seconds * 1e3, gflops=flop / seconds / 1e9)
    if library.startswith("fusedattn"):
        if (key, "torch") in best_s:
            benchmark.extra_info["speedup_vs_torch"] = best_s[key, "torch"] / seconds
        rivals = [best_s[key, rival] for rival in ("torch", "onnxruntime") if (key, rival) in best_s]
        if key[1] == "float32" and rivals:
            benchmark.extra_info["speedup_vs_best_fp32"] = min(rivals) / seconds


@pytest.mark.parametrize(("row", "dtype_name", "library"),
                         [pytest.param(*p, id=f"{p[0].label}-{p[1]}-{p[2]}") for p in FORWARD])
def test_forward_speed(benchmark, row, dtype_name, library, threads, torch_module, best_s):
    """One library, one row, one dtype: ms, GFLOP/s and the ratios to torch (and onnxruntime)."""
    torch, torch_reason = torch_module
    if library == "torch" and torch is None:
        pytest.skip(torch_reason)
    q, k, v = _inputs(row, BF16 if dtype_name == "bfloat16" else np.dtype(dtype_name))
    run = _forward_runner(library, row, q, k, v, threads, torch)
    if library != "torch" and torch is not None:
        theirs = _as_float(_forward_runner("torch", row, q, k, v, threads, torch)())
        err = float(np.max(np.abs(_as_float(run()) - theirs)) / np.max(np.abs(theirs)))
        assert err <= CHECK[dtype_name], f"{library} differs from torch on {row.label} {dtype_name}: {err:.2e}"
    key = (row.label, dtype_name)
    benchmark.group = f"{row.label}-{dtype_name}"
    benchmark.extra_info.update(library=library, shape=row.label, dtype=dtype_name, threads=threads,
                                isa=fusedattn.backend_info()["isa"] if library.startswith("fusedattn") else None)
    seconds = _bench.run_benchmark(benchmark, run, target_s=0.5, min_reps=6)
    if seconds is not None:  # None: --benchmark-disable, one untimed call
        _record(benchmark, best_s, key, library, seconds, _bench.attention_flops(row))


def _backward_runner(library, row, q, k, v, dout, threads, torch):
    if library == "fusedattn":
        def run_fused():
            _, backward = fusedattn.attention_vjp(q, k, v, causal=row.causal, num_threads=threads)
            return backward(dout)

        return run_fused
    leaves = tuple(_torch_tensor(torch, x, requires_grad=True) for x in (q, k, v))
    grad_out = _torch_tensor(torch, dout)

    def run_torch():
        for leaf in leaves:
            leaf.grad = None
        torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=row.causal).backward(grad_out)
        return tuple(leaf.grad for leaf in leaves)

    return run_torch


@pytest.mark.parametrize(("row", "dtype_name", "library"),
                         [pytest.param(*p, id=f"fwd+bwd-{p[0].label}-{p[1]}-{p[2]}") for p in BACKWARD])
def test_forward_backward_speed(benchmark, row, dtype_name, library, threads, torch_module, best_s):
    """bfloat16 forward + backward (a training step's attention): ms, GFLOP/s, ratio to torch."""
    torch, torch_reason = torch_module
    if torch is None:  # the fusedattn row is only a ratio to torch here; the forward rows time it alone
        pytest.skip(torch_reason)
    q, k, v = _inputs(row, BF16)
    dout = np.random.default_rng(1).standard_normal(q.shape).astype(BF16)
    run = _backward_runner(library, row, q, k, v, dout, threads, torch)
    if library == "fusedattn":
        want = _backward_runner("torch", row, q, k, v, dout, threads, torch)()
        for name, got, expected in zip(("dq", "dk", "dv"), run(), want):
            expected = _as_float(expected)
            err = float(np.max(np.abs(_as_float(got) - expected)) / max(float(np.max(np.abs(expected))), 1.0))
            assert err <= 16 * 2.0 ** -7, f"{name} differs from torch's on {row.label}: {err:.2e}"
    key = ("forward+backward " + row.label, dtype_name)
    benchmark.group = f"fwd+bwd {row.label}-{dtype_name}"
    benchmark.extra_info.update(library=library, shape=row.label, dtype=dtype_name, threads=threads,
                                isa=fusedattn.backend_info()["isa"] if library == "fusedattn" else None)
    seconds = _bench.run_benchmark(benchmark, run, target_s=0.5, min_reps=4)
    if seconds is not None:
        _record(benchmark, best_s, key, library, seconds, _bench.forward_backward_flops(row))
