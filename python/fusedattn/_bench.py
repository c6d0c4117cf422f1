"""Measurement helpers shared by ``fusedattn bench`` and the pytest benchmarks in ``benchmarks/``.

Both front ends build their inputs, baselines, correctness checks and repetition counts here, so
the numbers they report are measured the same way. The peers are optional and only imported on demand:
onnxruntime (its ``com.microsoft`` MultiHeadAttention operator, in the ``[bench]`` extra) and torch.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import _backend

__all__ = [
    "Case", "Shape", "Timing", "Check", "Machine",
    "DEFAULT_CASES", "QUICK_CASES", "LIBRARIES", "ISAS", "MEMORY_BOUND_MAX_LQ", "BANDWIDTH_PROBE_BYTES",
    "MEMORY_CASE", "MEMORY_LIMIT_BYTES", "NAIVE_SCORE_LIMIT_BYTES", "TOLERANCES",
    "attention_flops", "bytes_moved", "cases_from", "causal_keep_mask", "check_against_naive", "fused_variant",
    "gflops", "isa_for", "isa_unavailable", "is_memory_bound", "library_isa", "limit_threads", "load_torch",
    "make_inputs", "make_runner", "measure_extra_memory", "measure_machine", "naive_attention", "naive_fits",
    "parse_shape", "plan_repetitions", "run_benchmark", "score_bytes", "time_best", "timing_budget", "utilisation",
    "FORWARD_BACKWARD_FLOP_FACTOR", "NAIVE_ADDITIVE_CHUNK_BYTES", "forward_backward_flops", "make_backward_runner",
    "naive_additive_attention", "PEERS", "NOISY_RATIO", "NOISY_WORST_RATIO", "is_noisy", "last_level_cache_bytes", "cache_resident",
    "load_onnxruntime", "onnxruntime_runner", "onnxruntime_unsupported", "unsupported", "CACHE_MARGIN",
    "DECODE_MAX_BYTES", "kv_bytes", "beyond_cache",
]

# The peers run first so a fusedattn measurement can be compared to their times taken just before it.
LIBRARIES = ("torch", "onnxruntime", "fusedattn", "naive")

# The other attention implementations fusedattn is compared with, the one on every machine first:
# onnxruntime comes with the [bench] extra (~15 MB, CPU only), torch where the user installed it.
PEERS = ("onnxruntime", "torch")

# A measurement whose median repetition took more than NOISY_RATIO times its best, or whose slowest took
# more than NOISY_WORST_RATIO times it, was disturbed (another process took the cores, the frequency
# dropped): its best-of is still the best estimate, but the row is flagged. One preempted repetition out of
# many moves the median little, so a quiet machine does not flag; a loaded one does.
NOISY_RATIO = 1.3
NOISY_WORST_RATIO = 3.0

# The kernel's instruction-set paths, slowest first. ``fusedattn[NAME]`` (see :func:`fused_variant`) is
# fusedattn forced onto one of them; plain ``fusedattn`` is whichever path the dispatcher selected.
ISAS = ("scalar", "avx2", "avx512", "avx512bf16", "amx")

# Up to this many query rows, attention streams K and V once for very little arithmetic per byte: it is
# bounded by memory bandwidth, so its GFLOP/s say nothing and its bytes per second say everything.
MEMORY_BOUND_MAX_LQ = 16

# Far past every cache level, and steadier than the probe's 512 MiB default for ~1 s of streaming.
BANDWIDTH_PROBE_BYTES = 1 << 30

# The naive baseline materialises the (B, H, Lq, Lk) scores; past this it would swap rather than measure.
NAIVE_SCORE_LIMIT_BYTES = 1 << 30

# float32 accumulates over up to ~10^4 keys in a different order than NumPy's BLAS: 1e-4 leaves room for
# that and still catches a wrong mask or scale, whose errors are O(1e-2) or larger.
TOLERANCES = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


@dataclass(frozen=True)
class Shape:
    """One attention problem: q is (batch, heads, lq, d), k and v are (batch, heads, lk, d).

    ``causal`` uses the bottom-right alignment (query i sees keys ``j <= i + lk - lq``), the KV-cache
    convention, which equals torch's ``is_causal`` when ``lq == lk``.
    """

    batch: int
    heads: int
    lq: int
    lk: int
    d: int
    causal: bool = False

    def __post_init__(self):
        if min(self.batch, self.heads, self.lq, self.lk, self.d) < 1:
            raise ValueError(f"every dimension must be >= 1, got {self.dims}")
        if self.causal and self.lq > self.lk:
            # Bottom-right alignment would leave the first lq - lk query rows with no key at all.
            raise ValueError(f"a causal shape needs lq <= lk, got lq={self.lq}, lk={self.lk}")

    @property
    def dims(self) -> Tuple[int, int, int, int, int]:
        return (self.batch, self.heads, self.lq, self.lk, self.d)

    @property
    def label(self) -> str:
        """The ``--shapes`` spelling, e.g. ``1x8x2048x2048x64c``; :func:`parse_shape` reads it back."""
        return "x".join(map(str, self.dims)) + ("c" if self.causal else "")


_SHAPE_RE = re.compile(r"^\s*(\d+)x(\d+)x(\d+)x(\d+)x(\d+)(c?)\s*$", re.IGNORECASE)


def parse_shape(text: str) -> Shape:
    """Parse ``BxHxLqxLkxD`` with an optional trailing ``c`` for causal, e.g. ``1x8x1024x1024x64c``."""
    match = _SHAPE_RE.match(text)
    if match is None:
        raise ValueError(f"bad shape {text!r}: expected BxHxLqxLkxD with an optional trailing 'c' (causal)")
    b, h, lq, lk, d = (int(g) for g in match.groups()[:5])
    return Shape(b, h, lq, lk, d, causal=bool(match.group(6)))


class Case(NamedTuple):
    """A shape and the floating-point dtype to run it in."""

    shape: Shape
    dtype: np.dtype

    @property
    def label(self) -> str:
        return f"{self.shape.label}-{np.dtype(self.dtype).name}"


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)

DEFAULT_CASES = (
    Case(Shape(1, 8, 512, 512, 64), _F32),
    Case(Shape(1, 8, 2048, 2048, 64), _F32),
    Case(Shape(1, 8, 2048, 2048, 64, causal=True), _F32),
    Case(Shape(1, 8, 2048, 2048, 128), _F32),
    Case(Shape(4, 16, 256, 256, 64), _F32),
    Case(Shape(1, 32, 1, 8192, 128), _F32),  # single-token decode against a long KV cache
    Case(Shape(1, 8, 1024, 1024, 64), _F64),
)

# Small enough that all three libraries finish in well under a minute on two cores.
QUICK_CASES = (
    Case(Shape(1, 8, 512, 512, 64), _F32),
    Case(Shape(4, 16, 256, 256, 64), _F32),
    Case(Shape(1, 8, 1024, 1024, 64, causal=True), _F32),
    Case(Shape(1, 32, 1, 4096, 128), _F32),
)


def attention_flops(shape: Shape) -> float:
    """Floating-point operations of one forward pass: ``4*B*H*Lq*Lk*D``, halved when causal.

    Counts the two matrix products (q k^T and p v, a multiply and an add each) and ignores the
    softmax, the usual convention, so GFLOP/s figures compare with those of other attention kernels.
    """
    b, h, lq, lk, d = shape.dims
    flops = 4.0 * b * h * lq * lk * d
    return flops / 2 if shape.causal else flops


def gflops(shape: Shape, seconds: float) -> float:
    """Throughput in GFLOP/s of one forward pass of ``shape`` that took ``seconds``."""
    return attention_flops(shape) / seconds / 1e9


def score_bytes(shape: Shape, dtype) -> int:
    """Bytes of the (B, H, Lq, Lk) score matrix that the naive baseline materialises."""
    b, h, lq, lk, _ = shape.dims
    return b * h * lq * lk * np.dtype(dtype).itemsize


def naive_fits(shape: Shape, dtype, limit: int = NAIVE_SCORE_LIMIT_BYTES) -> bool:
    """Whether the naive baseline's score matrix stays under ``limit`` bytes."""
    return score_bytes(shape, dtype) <= limit


def bytes_moved(shape: Shape, dtype) -> int:
    """Bytes one forward pass must move at least: q, k and v read once, the output written once.

    The yardstick of memory-bound (decode) shapes, whose time is this traffic over the bandwidth.
    """
    b, h, lq, lk, d = shape.dims
    return (2 * lq + 2 * lk) * b * h * d * np.dtype(dtype).itemsize


def is_memory_bound(shape: Shape) -> bool:
    """Whether ``shape`` is judged by memory bandwidth rather than by FLOPs (decode: few query rows)."""
    return shape.lq <= MEMORY_BOUND_MAX_LQ


def make_inputs(shape: Shape, dtype=np.float32, seed: int = 0):
    """Random contiguous ``(q, k, v)`` for ``shape`` in ``dtype``, reproducible through ``seed``.

    Standard-normal entries with the default ``1/sqrt(D)`` scale keep the scores O(1), the regime of
    trained models, so the softmax is neither uniform nor a one-hot that would hide errors. The values
    are drawn straight into the final arrays: a float64 temporary would raise the peak RSS that
    :func:`measure_extra_memory` takes as its baseline, and could hide the kernel's own allocations.
    """
    rng = np.random.default_rng(seed)
    b, h, lq, lk, d = shape.dims
    arrays = (np.empty((b, h, lq, d), dtype), np.empty((b, h, lk, d), dtype), np.empty((b, h, lk, d), dtype))
    for x in arrays:
        rng.standard_normal(dtype=x.dtype, out=x)
    return arrays


def causal_keep_mask(lq: int, lk: int) -> np.ndarray:
    """Boolean ``(lq, lk)`` mask, True where query i may attend key j (``j <= i + lk - lq``)."""
    return np.arange(lk)[None, :] <= np.arange(lq)[:, None] + (lk - lq)


def naive_attention(q, k, v, *, causal: bool = False, scale: Optional[float] = None) -> np.ndarray:
    """The textbook baseline ``softmax(q @ k^T * scale) @ v``, materialising the scores.

    Computed in the inputs' dtype with a max-subtracted (numerically stable) softmax, in place where
    NumPy allows, so it is as fast as straightforward NumPy gets. ``causal`` uses the bottom-right
    alignment of :class:`Shape`. k and v must have as many heads as q.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = q @ np.swapaxes(k, -1, -2)
    scores *= scale
    if causal:
        np.copyto(scores, -np.inf, where=~causal_keep_mask(q.shape[-2], k.shape[-2]))
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores @ v


def load_torch():
    """Import torch if it is installed: returns ``(module, None)`` or ``(None, one-line reason)``."""
    try:
        import torch
    except ImportError as exc:
        return None, f"torch is not installed ({exc.msg}); pip install torch to compare against it"
    except Exception as exc:  # a broken install should cost the column, not the whole benchmark
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"torch failed to import: {first_line}"
    return torch, None


def load_onnxruntime():
    """Import onnxruntime (and onnx, which builds its graph) if installed: ``(module, None)`` or ``(None, reason)``."""
    try:
        import onnx  # noqa: F401  (builds the one-node graph in onnxruntime_runner)
        import onnxruntime
    except ImportError as exc:
        return None, (f"onnxruntime / onnx not installed ({exc.msg}); pip install onnxruntime onnx "
                      "(both come with fusedattn[bench])")
    except Exception as exc:  # a broken install should cost the column, not the whole benchmark
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"onnxruntime failed to import: {first_line}"
    return onnxruntime, None


def onnxruntime_unsupported(shape: Shape, dtype) -> Optional[str]:
    """Why onnxruntime's MultiHeadAttention cannot run ``shape`` in ``dtype`` here, or None when it can."""
    if np.dtype(dtype) != _F32:
        return f"{np.dtype(dtype).name}: its CPU MultiHeadAttention kernel takes float32"
    if shape.causal and shape.lq != shape.lk:
        return "causal with Lq != Lk: its unidirectional mask is not bottom-right aligned"
    return None


def unsupported(library: str, case: Case) -> Optional[str]:
    """Why ``library`` does not run ``case`` (a one-line reason for the table), or None when it does."""
    if library == "onnxruntime":
        return onnxruntime_unsupported(case.shape, case.dtype)
    return None


def onnxruntime_runner(q, k, v, *, causal: bool, threads: int, scale: Optional[float] = None) -> Callable[[], object]:
    """onnxruntime's ``com.microsoft`` MultiHeadAttention on ``(B, H, L, D)`` float32 arrays, as a callable.

    The operator takes ``(B, L, H * D)`` inputs: they are transposed once here, outside the timed call, as a
    model holding that layout would not transpose at all; the callable returns a ``(B, H, Lq, D)`` view of
    the output. ``causal`` uses the operator's ``unidirectional`` mask, which equals ``is_causal`` when
    ``Lq == Lk`` (see :func:`onnxruntime_unsupported`). One session, ``threads`` intra-op threads.
    """
    onnxruntime, reason = load_onnxruntime()
    if onnxruntime is None:
        raise ImportError(reason)
    from onnx import TensorProto, helper

    if q.ndim != 4 or k.shape[:2] != q.shape[:2] or v.shape != k.shape:
        raise ValueError(f"onnxruntime_runner takes q (B, H, Lq, D) and k, v (B, H, Lk, D), got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=h,
                            unidirectional=int(bool(causal)), scale=scale)
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [b, length, h * d])
              for name, length in (("q", lq), ("k", lk), ("v", lk))]
    output = helper.make_tensor_value_info("o", TensorProto.FLOAT, [b, lq, h * d])
    model = helper.make_model(helper.make_graph([node], "mha", inputs, [output]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # Idle onnxruntime threads would otherwise spin-wait for the next run, taking the cores from whichever
    # library is timed after it (measured: fusedattn 1 ms -> 8 ms on two cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {name: np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 2, 1, 3).reshape(b, x.shape[2], h * d))
             for name, x in zip("qkv", (q, k, v))}
    return lambda: session.run(None, feeds)[0].reshape(b, lq, h, d).transpose(0, 2, 1, 3)


def make_runner(library: str, q, k, v, *, causal: bool, threads: int, torch=None) -> Callable[[], object]:
    """A zero-argument callable running one forward pass of ``library`` on ``(q, k, v)``.

    Everything that is not part of the attention itself (tensor wrapping, mask building) happens here,
    outside the timed callable. ``library`` is one of :data:`LIBRARIES` or a :func:`fused_variant`,
    whose ISA the caller selects around the calls with :func:`isa_for` (forcing it inside the callable
    would time the switch too); ``torch`` is the module from :func:`load_torch`; onnxruntime is
    imported by :func:`onnxruntime_runner`. The scale is pinned to ``1/sqrt(D)`` for all so no default can
    differ.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    lq, lk = q.shape[-2], k.shape[-2]
    if library == "fusedattn" or library_isa(library) is not None:
        import fusedattn

        mode = "bottom_right" if causal else False
        return lambda: fusedattn.attention(q, k, v, causal=mode, scale=scale, num_threads=threads)
    if library == "naive":
        return lambda: naive_attention(q, k, v, causal=causal, scale=scale)
    if library == "torch":
        if torch is None:
            raise ValueError("make_runner('torch', ...) needs the torch module from load_torch()")
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))  # zero-copy views
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if causal and lq != lk:
            # is_causal is top-left aligned; the bottom-right region needs an explicit mask.
            keep = torch.from_numpy(causal_keep_mask(lq, lk))
            return lambda: _torch_call(torch, sdpa, tq, tk, tv, attn_mask=keep, scale=scale)
        return lambda: _torch_call(torch, sdpa, tq, tk, tv, is_causal=causal, scale=scale)
    if library == "onnxruntime":
        if causal and lq != lk:
            raise ValueError("onnxruntime's unidirectional mask is not bottom-right aligned: Lq must equal Lk")
        return onnxruntime_runner(q, k, v, causal=causal, threads=threads, scale=scale)
    raise ValueError(f"unknown library {library!r}; expected one of {LIBRARIES}")


def fused_variant(isa: str) -> str:
    """The library name of fusedattn forced onto the ``isa`` path, e.g. ``fusedattn[avx2]``."""
    return f"fusedattn[{isa}]"


_VARIANT_RE = re.compile(r"^fusedattn\[(\w+)\]$")


def library_isa(library: str) -> Optional[str]:
    """The ISA a :func:`fused_variant` name forces, or None for any other library name."""
    match = _VARIANT_RE.match(library)
    return match.group(1) if match else None


def isa_unavailable(isa: str) -> Optional[str]:
    """Why fusedattn cannot be forced onto ``isa`` here (a one-line reason), or None when it can."""
    if _backend._core is None:
        return "no compiled extension (NumPy reference fallback)"
    if isa not in _backend._core.compiled_isas():
        return f"not compiled into this build (it has {', '.join(_backend._core.compiled_isas())})"
    if isa not in _backend.available_isas():
        if isa == "amx":
            return f"not supported by this CPU: {_backend._core.amx_status()['reason']}"
        return "not supported by this CPU"
    return None


@contextlib.contextmanager
def isa_for(library: str) -> Iterator[None]:
    """Force the ISA path that a :func:`fused_variant` name asks for during the block, then restore it.

    Any other library name runs unchanged. Raises ``ValueError`` when the path cannot run here.
    """
    isa = library_isa(library)
    if isa is None:
        yield
        return
    previous = _backend.force_isa(isa)
    try:
        yield
    finally:
        _backend.force_isa(previous)


def timing_budget(library: str, *, min_reps: int = 3) -> dict:
    """Keyword arguments for :func:`plan_repetitions` / :func:`time_best` suited to ``library``.

    The scalar path runs ~10x slower than the SIMD ones; its cost is worth knowing to a few percent,
    not to the best of many runs, so it gets a third of the time budget and may settle for one rep.
    """
    if library_isa(library) == "scalar":
        return {"target_s": 0.1, "min_reps": 1}
    return {"target_s": 0.3, "min_reps": min_reps}


def _torch_call(torch, sdpa, *args, **kwargs):
    # inference_mode skips autograd bookkeeping, as a user timing inference would.
    with torch.inference_mode():
        return sdpa(*args, **kwargs)


@contextlib.contextmanager
def limit_threads(threads: int) -> Iterator[str]:
    """Bound torch's and NumPy's BLAS thread pools to ``threads`` for the duration of the block.

    fusedattn takes ``num_threads=`` per call instead. torch is only touched if it is already
    imported; NumPy's BLAS needs the optional ``threadpoolctl``. Yields a one-line description of
    what the NumPy baseline runs with, for the report header.
    """
    torch = sys.modules.get("torch")
    previous_torch = torch.get_num_threads() if torch is not None else None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    try:
        if torch is not None:
            torch.set_num_threads(threads)
        if threadpool_limits is None:
            yield "NumPy BLAS threads not limited (pip install threadpoolctl to pin them)"
        else:
            with threadpool_limits(limits=threads, user_api="blas"):
                yield f"NumPy BLAS threads: {threads} (threadpoolctl)"
    finally:
        if torch is not None:
            torch.set_num_threads(previous_torch)


class Check(NamedTuple):
    """The outcome of comparing a library's output with the naive baseline."""

    ok: Optional[bool]  # None when the comparison could not be made
    max_abs_err: Optional[float]
    scope: str  # "full", "first head" or the reason it was not checked

    @property
    def status(self) -> str:
        if self.ok is None:
            return f"unchecked ({self.scope})"
        details = [] if self.scope == "full" else [self.scope]
        if self.max_abs_err is not None:
            details.append(f"max err {self.max_abs_err:.1e}")
        return f"{'ok' if self.ok else 'MISMATCH'} ({', '.join(details)})"


def check_against_naive(libraries: Sequence[str], case: Case, q, k, v, *, threads: int,
                        torch=None) -> Dict[str, Check]:
    """Compare each library's output on ``(q, k, v)`` with :func:`naive_attention`.

    Uses :data:`TOLERANCES` for the dtype. When the full score matrix would be too large, checks the
    first (batch, head) slice alone, which runs the same kernel code path. A library that raises is
    reported as a mismatch carrying the error, so one broken case does not end a whole run.
    """
    shape = case.shape
    if naive_fits(shape, case.dtype):
        scope = "full"
    elif naive_fits(Shape(1, 1, shape.lq, shape.lk, shape.d, shape.causal), case.dtype):
        q, k, v = (x[:1, :1] for x in (q, k, v))
        scope = "first head"
    else:
        return {lib: Check(None, None, "too large for the naive check") for lib in libraries}
    want = naive_attention(q, k, v, causal=shape.causal)
    tol = TOLERANCES[np.dtype(case.dtype)]
    checks = {}
    for lib in libraries:
        try:
            with isa_for(lib):
                got = np.asarray(make_runner(lib, q, k, v, causal=shape.causal, threads=threads, torch=torch)())
        except Exception as exc:
            checks[lib] = Check(False, None, f"raised {type(exc).__name__}: {exc}")
            continue
        if got.shape != want.shape:
            checks[lib] = Check(False, None, f"shape {got.shape} != {want.shape}")
            continue
        with np.errstate(invalid="ignore"):
            err = float(np.max(np.abs(got.astype(np.float64) - want))) if got.size else 0.0
        checks[lib] = Check(bool(np.allclose(got, want, rtol=tol, atol=tol)), err, scope)
    return checks


class Timing(NamedTuple):
    """Best-of-``reps`` time of one call, each rep timing ``inner`` back-to-back calls; ``median_s`` and
    ``worst_s`` are the median and slowest reps' times per call (NaN when unknown), what :func:`is_noisy`
    judges."""

    best_s: float
    reps: int
    inner: int
    median_s: float = math.nan
    worst_s: float = math.nan


def is_noisy(timing: Timing) -> bool:
    """Whether the repetitions of ``timing`` disagree widely: the median over :data:`NOISY_RATIO` x the best
    (three reps or more), or the slowest over :data:`NOISY_WORST_RATIO` x the best (two or more).

    One repetition cannot disagree with itself, so a single-rep timing is never noisy.
    """
    if timing.reps >= 3 and timing.median_s > NOISY_RATIO * timing.best_s:
        return True
    return timing.reps >= 2 and timing.worst_s > NOISY_WORST_RATIO * timing.best_s


def run_benchmark(benchmark, run: Callable[[], object], *, target_s: float = 0.5, min_reps: int = 6):
    """Time ``run`` under pytest-benchmark: a warm-up, then the rounds :func:`plan_repetitions` fits in
    ``target_s``; returns the best time in seconds. Under ``--benchmark-disable`` it calls ``run`` once,
    untimed, and returns None.
    """
    if not benchmark.enabled:
        benchmark.pedantic(run)
        return None
    rounds, iterations = plan_repetitions(run, target_s=target_s, min_reps=min_reps)
    benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=1)
    return benchmark.stats.stats.min


def plan_repetitions(fn: Callable[[], object], *, target_s: float = 0.3, min_reps: int = 3,
                     max_reps: int = 200, min_sample_s: float = 1e-3) -> Tuple[int, int]:
    """Warm ``fn`` up and choose ``(reps, inner)`` so all reps together take about ``target_s``.

    ``inner`` calls are timed as one sample when a single call is shorter than ``min_sample_s``, so
    timer resolution and loop overhead stay negligible. A call slower than ``target_s`` still gets
    ``max(1, min_reps // 2)`` reps: a best-of needs more than one sample where it is affordable, but
    seconds-long naive cases should not dominate the run.
    """
    start = time.perf_counter()
    fn()  # first call: page faults, thread-pool start-up, lazy initialisation
    t0 = time.perf_counter() - start
    if t0 < min_sample_s:
        # One fast call is too noisy an estimate; re-estimate from the best of a few.
        for _ in range(5):
            start = time.perf_counter()
            fn()
            t0 = min(t0, time.perf_counter() - start)
    t0 = max(t0, 1e-7)
    inner = max(1, int(min_sample_s / t0))
    per_rep = inner * t0
    if per_rep > target_s:
        return max(1, min_reps // 2), inner
    return int(min(max_reps, max(min_reps, target_s // per_rep))), inner


def time_best(fn: Callable[[], object], *, target_s: float = 0.3, min_reps: int = 3, reps: Optional[int] = None,
              inner: Optional[int] = None) -> Timing:
    """Best-of-N wall time of one call to ``fn``, after a warm-up.

    The minimum is the estimate least disturbed by other processes and frequency ramps. N adapts
    via :func:`plan_repetitions` (with ``target_s`` and ``min_reps``) unless ``reps`` and ``inner``
    are both given.
    """
    if reps is None or inner is None:
        reps, inner = plan_repetitions(fn, target_s=target_s, min_reps=min_reps)
    else:
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return Timing(min(samples), reps, inner, float(np.median(samples)), max(samples))


def cases_from(shapes: Optional[Sequence[Shape]], dtype: Optional[str], quick: bool = False,
               llc_bytes: Optional[int] = None) -> list:
    """The cases a command line asks for: explicit ``shapes`` or a preset, in ``dtype``.

    Explicit shapes default to float32 and run as given; a preset keeps its own dtypes unless ``dtype``
    overrides them, and its decode rows are sized past ``llc_bytes`` (:func:`beyond_cache`).
    """
    if shapes:
        cases = [Case(s, np.dtype(dtype or "float32")) for s in shapes]
    else:
        preset = QUICK_CASES if quick else DEFAULT_CASES
        cases = [beyond_cache(Case(c.shape, np.dtype(dtype)) if dtype else c, llc_bytes) for c in preset]
    unique = []
    for case in cases:  # an override can collapse two preset cases into one
        if case not in unique:
            unique.append(case)
    return unique


class Machine(NamedTuple):
    """What this machine can do at most on ``threads`` threads: the yardsticks of the % columns.

    Both probes are the compiled extension's; on the reference fallback they are None and
    ``unavailable`` says why.
    """

    fp32_peak_gflops: Optional[float]  # fp32 FMA throughput of the ``isa`` path
    read_bandwidth_gbs: Optional[float]  # streaming read of a buffer far larger than the caches
    threads: int
    isa: Optional[str]
    bandwidth_probe_bytes: int
    unavailable: Optional[str] = None
    llc_bytes: Optional[int] = None  # the last-level cache, see last_level_cache_bytes()
    probe_note: Optional[str] = None  # set when the repeated probes disagree widely (other load)

    def peak_gflops(self, dtype) -> Optional[float]:
        """The FLOP ceiling for ``dtype``: float64 vectors hold half as many lanes as float32 ones."""
        if self.fp32_peak_gflops is None:
            return None
        return self.fp32_peak_gflops / 2 if np.dtype(dtype) == _F64 else self.fp32_peak_gflops

    def as_json(self) -> dict:
        """The fields as stored in ``fusedattn bench --json``, with the derived float64 peak."""
        return {**self._asdict(), "fp64_peak_gflops": self.peak_gflops(_F64),
                "memory_bound_max_lq": MEMORY_BOUND_MAX_LQ}


def measure_machine(threads: int, *, bandwidth_bytes: int = BANDWIDTH_PROBE_BYTES, repeats: int = 2) -> Machine:
    """Measure the fp32 FMA peak of the selected ISA and the streaming read bandwidth (~3 s).

    Measured with the same thread count as the benchmarks, so percentages compare like with like.
    Both are ceilings, so the best of ``repeats`` probes is kept: a probe that another process
    interrupted can only read low.
    """
    core = _backend._core
    llc = last_level_cache_bytes()
    if core is None:
        return Machine(None, None, threads, None, bandwidth_bytes,
                       unavailable="no compiled extension (NumPy reference fallback): nothing to probe with",
                       llc_bytes=llc)
    peaks = [float(core.measure_fma_peak_gflops(threads)) for _ in range(repeats)]
    bandwidths = [float(core.measure_read_bandwidth_gbs(threads, bandwidth_bytes)) for _ in range(repeats)]
    notes = [f"the {what} probes disagree ({min(values):.1f} vs {max(values):.1f} {unit}): other load?"
             for what, values, unit in (("peak", peaks, "GFLOP/s"), ("bandwidth", bandwidths, "GB/s"))
             if max(values) > 1.5 * min(values)]
    return Machine(max(peaks), max(bandwidths), threads, str(core.current_isa()), bandwidth_bytes, llc_bytes=llc,
                   probe_note="; ".join(notes) or None)


def last_level_cache_bytes() -> Optional[int]:
    """The size of the CPU's largest (last-level) cache in bytes, from Linux sysfs or ``sysconf``; None if unknown."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        entries = []
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size"), encoding="ascii") as handle:
                text = handle.read().strip()
        except OSError:
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match:
            sizes.append(int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)])
    if not sizes:
        for name in ("SC_LEVEL4_CACHE_SIZE", "SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
            try:
                value = os.sysconf(name)
            except (ValueError, OSError, AttributeError):
                continue
            if value and value > 0:
                sizes.append(int(value))
    return max(sizes) if sizes else None


# A memory-bound row's K and V must be this many times the last-level cache for its % of bandwidth to be
# a read from memory: smaller, they stay (partly) cached between repetitions and can read above 100%.
CACHE_MARGIN = 4

# The presets' decode rows grow their Lk up to this many bytes of K + V to get past the cache.
DECODE_MAX_BYTES = 1 << 30


def kv_bytes(shape: Shape, dtype) -> int:
    """Bytes of K and V together."""
    b, h, _, lk, d = shape.dims
    return 2 * b * h * lk * d * np.dtype(dtype).itemsize


def cache_resident(shape: Shape, dtype, llc_bytes: Optional[int]) -> bool:
    """Whether a memory-bound row's K and V may stay in the last-level cache between repetitions.

    Such a row's bytes per second measure the cache, not memory: the table says "in cache" instead of a
    percentage of the read bandwidth. Unknown cache size: False.
    """
    return (llc_bytes is not None and is_memory_bound(shape)
            and kv_bytes(shape, dtype) < CACHE_MARGIN * llc_bytes)


def beyond_cache(case: Case, llc_bytes: Optional[int], limit: int = DECODE_MAX_BYTES) -> Case:
    """``case`` with its Lk doubled until K + V take :data:`CACHE_MARGIN` x the cache, if it is a memory-bound
    case and ``limit`` bytes allow; any other case unchanged."""
    shape, dtype = case.shape, case.dtype
    if llc_bytes is None or not is_memory_bound(shape):
        return case
    while cache_resident(shape, dtype, llc_bytes) and 2 * kv_bytes(shape, dtype) <= limit:
        shape = Shape(shape.batch, shape.heads, shape.lq, 2 * shape.lk, shape.d, shape.causal)
    return Case(shape, dtype)


def utilisation(shape: Shape, dtype, seconds: float, machine: Machine) -> Dict[str, Optional[float]]:
    """How close a forward pass taking ``seconds`` came to the machine's limits, in percent.

    Always ``pct_of_peak`` (GFLOP/s over the dtype's peak, see :meth:`Machine.peak_gflops`); for
    memory-bound shapes (:func:`is_memory_bound`) also ``pct_of_bandwidth``: :func:`bytes_moved` per
    second over the read bandwidth. Values are None when the machine could not be probed.
    """
    peak = machine.peak_gflops(dtype)
    result = {"pct_of_peak": 100 * gflops(shape, seconds) / peak if peak else None}
    if is_memory_bound(shape):
        bandwidth = machine.read_bandwidth_gbs
        result["pct_of_bandwidth"] = (100 * bytes_moved(shape, dtype) / seconds / 1e9 / bandwidth
                                      if bandwidth else None)
    return result


# A long-context prefill whose naive score matrix alone would take 8.6 GB: a fused kernel should not care.
MEMORY_CASE = Case(Shape(1, 8, 16384, 16384, 64), _F32)

# What fusedattn may allocate beyond its output on MEMORY_CASE: under 1% of what the scores would take.
MEMORY_LIMIT_BYTES = 64 * 10**6

# The child runs in a fresh interpreter so that its peak RSS is its own: the parent's, raised by every
# naive baseline measured before, would hide the kernel's allocations under an old high-water mark.
_MEMORY_CHILD = "import sys; from fusedattn._bench import _memory_child; _memory_child(sys.argv[1:])"


def measure_extra_memory(case: Case = MEMORY_CASE, *, threads: int, timeout_s: float = 600) -> dict:
    """Memory fusedattn needs beyond its inputs and output on ``case``, measured in a subprocess.

    The child allocates q, k and v, records its peak RSS as the baseline, runs one forward pass and
    records the peak again: ``extra_bytes`` = peak - baseline - output bytes. The peak is Linux's
    ``VmHWM`` where there is a /proc, else ``ru_maxrss`` (see :func:`_peak_rss`). Returns a dict as stored
    in ``fusedattn bench --json``; ``ok`` is ``extra_bytes < MEMORY_LIMIT_BYTES``, or None with a
    ``skipped`` reason when it could not be measured. Naive NumPy is never run on the case: its
    ``naive_score_bytes`` is the matrix it would have to materialise.
    """
    shape, dtype = case.shape, np.dtype(case.dtype)
    result = {
        "shape": shape.label, "dtype": dtype.name, "threads": threads,
        "io_bytes": bytes_moved(shape, dtype), "naive_score_bytes": score_bytes(shape, dtype),
        "limit_bytes": MEMORY_LIMIT_BYTES, "ok": None,
    }
    if _backend._core is None:
        # The reference fallback materialises the scores: it would need those gigabytes itself.
        return {**result, "skipped": "no compiled extension (NumPy reference fallback)"}
    try:
        import resource  # noqa: F401  (POSIX only; the child's fallback where /proc is missing)
    except ImportError:
        return {**result, "skipped": "no resource module on this platform to read the peak RSS"}
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    # The child must import this very fusedattn (an uninstalled checkout included) and run the ISA
    # path this process has selected.
    env["PYTHONPATH"] = os.pathsep.join([package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env[_backend.ISA_ENV_VAR] = str(_backend._core.current_isa())
    command = [sys.executable, "-c", _MEMORY_CHILD, shape.label, dtype.name, str(threads)]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {**result, "skipped": f"the child took longer than {timeout_s:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {**result, "skipped": f"the child failed: {last}"}
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = child["rss_peak_bytes"] - child["rss_baseline_bytes"] - child["out_bytes"]
    return {**result, **child, "extra_bytes": extra, "ok": extra < MEMORY_LIMIT_BYTES}


def _peak_rss() -> Tuple[int, str]:
    """This process's peak resident set size in bytes, and where it was read from."""
    # Linux carries the spawning process's peak into a child's ru_maxrss across exec: spawned from a
    # process that once held 1 GiB (the bandwidth probe's buffer), the child would start at 1 GiB and
    # report no growth at all. VmHWM belongs to the child's own address space.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    import resource

    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"


def _memory_child(argv: Sequence[str]) -> None:
    """Body of :func:`measure_extra_memory`'s subprocess: prints one JSON line of RSS figures."""
    import fusedattn

    label, dtype, threads = argv[0], np.dtype(argv[1]), int(argv[2])
    shape = parse_shape(label)
    q, k, v = make_inputs(shape, dtype)
    baseline, source = _peak_rss()
    start = time.perf_counter()
    out = fusedattn.attention(q, k, v, causal="bottom_right" if shape.causal else False, num_threads=threads)
    seconds = time.perf_counter() - start
    peak, _ = _peak_rss()
    print(json.dumps({"rss_baseline_bytes": baseline, "rss_peak_bytes": peak, "rss_source": source,
                      "out_bytes": int(out.nbytes), "seconds": seconds, "isa": fusedattn.backend_info()["isa"]}))


# ---------------------------------------------------------------------------------------------
# Forward + backward (a training step's attention) and the additive score family
# ---------------------------------------------------------------------------------------------

# The forward pass is 2 matrix products (q k^T, p v). FlashAttention-2's backward recomputes q k^T and
# adds 4 more (dv = p^T dout, dp = dout v^T, dq = ds k, dk = ds^T q): 5 products, 2.5x the forward. So
# forward + backward = 7 products = 3.5x the forward's FLOPs, the convention of the FlashAttention papers.
FORWARD_BACKWARD_FLOP_FACTOR = 3.5


def forward_backward_flops(shape: Shape) -> float:
    """FLOPs of one forward plus backward pass: ``3.5 * attention_flops(shape)`` (halved when causal).

    See :data:`FORWARD_BACKWARD_FLOP_FACTOR`; the softmax and its derivative are not counted, as in
    :func:`attention_flops`.
    """
    return FORWARD_BACKWARD_FLOP_FACTOR * attention_flops(shape)


def make_backward_runner(library: str, q, k, v, dout, *, causal: bool, threads: int,
                         torch=None) -> Callable[[], tuple]:
    """A zero-argument callable running one forward + backward pass of ``library``; it returns (dq, dk, dv).

    ``library`` is ``"fusedattn"`` (:func:`fusedattn.attention_vjp`, then its backward closure) or
    ``"torch"`` (``scaled_dot_product_attention`` on ``requires_grad`` leaves viewing the same buffers, then
    ``out.backward(dout)``); torch's gradients come back as tensors (``np.asarray`` views them). ``causal``
    uses the bottom-right alignment of :class:`Shape`; the scale is pinned to ``1/sqrt(D)`` for both.
    torch's ``.grad`` is reset to None before each pass, as ``zero_grad(set_to_none=True)`` does in a
    training loop, so no accumulation into old gradients is timed.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    lq, lk = q.shape[-2], k.shape[-2]
    if library == "fusedattn":
        import fusedattn

        mode = "bottom_right" if causal else False

        def run_fused():
            _, backward = fusedattn.attention_vjp(q, k, v, causal=mode, scale=scale, num_threads=threads)
            return backward(dout)

        return run_fused
    if library == "torch":
        if torch is None:
            raise ValueError("make_backward_runner('torch', ...) needs the torch module from load_torch()")
        leaves = tuple(torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
        grad_out = torch.from_numpy(dout)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if causal and lq != lk:
            # is_causal is top-left aligned; the bottom-right region needs an explicit mask.
            kwargs = {"attn_mask": torch.from_numpy(causal_keep_mask(lq, lk))}
        else:
            kwargs = {"is_causal": causal}

        def run_torch():
            for leaf in leaves:
                leaf.grad = None
            sdpa(*leaves, scale=scale, **kwargs).backward(grad_out)
            return tuple(leaf.grad for leaf in leaves)

        return run_torch
    raise ValueError(f"unknown library {library!r} for the backward pass; expected 'fusedattn' or 'torch'")


# The additive baseline's (B, H, rows, Lk, D) tanh temporary: large enough that NumPy's per-call overhead
# vanishes, small enough to stay well inside memory (and near the last-level cache).
NAIVE_ADDITIVE_CHUNK_BYTES = 32 << 20


def naive_additive_attention(q, k, v, score_weight, *, chunk_bytes: int = NAIVE_ADDITIVE_CHUNK_BYTES) -> np.ndarray:
    """The NumPy baseline of additive attention: ``softmax(sum_d w_d tanh(q[:, None] + k[None])) @ v``.

    Materialises the ``(rows, Lk, D)`` tanh terms of a chunk of query rows at a time (all heads
    together), so memory stays bounded by ``chunk_bytes``; in the inputs' dtype, tanh in place, a
    max-subtracted softmax. q ``(B, H, Lq, D)``, k ``(B, H, Lk, D)``, v ``(B, H, Lk, Dv)``, ``score_weight``
    ``(D,)``; no mask (the benchmark shapes have none).
    """
    b, h, lq, d = q.shape
    lk = k.shape[-2]
    w = np.asarray(score_weight, dtype=q.dtype)
    out = np.empty((b, h, lq, v.shape[-1]), q.dtype)
    rows = max(1, chunk_bytes // (b * h * lk * d * q.itemsize))
    for r0 in range(0, lq, rows):
        r1 = min(lq, r0 + rows)
        terms = q[:, :, r0:r1, None, :] + k[:, :, None, :, :]
        np.tanh(terms, out=terms)
        scores = terms @ w  # (B, H, rows, Lk)
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out[:, :, r0:r1] = scores @ v
    return out
