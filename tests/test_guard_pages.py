"""No read or write outside the arrays: every input and output is placed flush against an inaccessible
(PROT_NONE) guard page, so a single byte read past the end, or before the start, faults.

The arrays are views into an anonymous mapping ``[guard page][data pages][guard page]``: the array's
memory extent (whatever its strides: contiguous, transposed, reversed, stepped, zero-stride broadcast)
ends on the last byte before the upper guard page, or starts on the first byte after the lower one. A
SIMD load that runs over the end of a row, a mask tail read a vector at a time, a reversed view walked the
wrong way: each is a segfault. So every case runs in a subprocess (one per ISA and code path, with
FUSEDATTN_ISA forcing the path), which must exit cleanly; it also checks each result against the
float64 reference, so a read of the wrong (but mapped) memory is caught too. The subprocess prints each
case before running it, so a crash names its case.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = mmap.PAGESIZE
PROT_NONE = 0

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MAP_PRIVATE") or sys.platform == "win32",
                                reason="guard pages need POSIX mmap / mprotect")


# ---------------------------------------------------------------------------------------------
# Guard-paged arrays
# ---------------------------------------------------------------------------------------------

_LIBC = None
_KEEP_ALIVE = []  # mappings stay mapped for the life of the worker: the arrays point into them


def _mprotect(address, length, prot):
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if _LIBC.mprotect(address, length, prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")


def guarded_empty(shape, dtype, strides=None, where="end"):
    """An array of ``shape`` / ``dtype`` / byte ``strides`` (default C order; negative and zero strides
    allowed) whose memory extent touches a PROT_NONE page: at its end (``where="end"``) or start."""
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape)
    if strides is None:
        strides = np.empty(shape, dtype).strides if all(shape) else (0,) * len(shape)
    if any(n == 0 for n in shape):
        return np.empty(shape, dtype)  # nothing to read
    low = sum(min(0, (n - 1) * s) for n, s in zip(shape, strides))
    high = sum(max(0, (n - 1) * s) for n, s in zip(shape, strides)) + dtype.itemsize
    extent = high - low
    data_pages = -(-extent // PAGE)
    mm = mmap.mmap(-1, (data_pages + 2) * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    _mprotect(base, PAGE, PROT_NONE)
    _mprotect(base + (data_pages + 1) * PAGE, PAGE, PROT_NONE)
    _KEEP_ALIVE.append(mm)
    first = PAGE + (data_pages * PAGE - extent if where == "end" else 0)  # offset of the extent's first byte
    array = np.ndarray(shape, dtype, buffer=mm, offset=first - low, strides=strides)
    assert array.__array_interface__["data"][0] + low == base + first
    return array


def guarded_like(values, layout="contiguous", where="end"):
    """A guard-paged array holding ``values``, seen through ``layout``:

    contiguous; transposed ((..., L, H, D) memory seen as (..., H, L, D)); reversed (negative strides on
    the last two axes); stepped (every other element of the last axis); broadcast (zero stride on the
    second-to-last axis, i.e. one row repeated).
    """
    values = np.asarray(values)
    shape, dtype, item = values.shape, values.dtype, values.dtype.itemsize
    if layout == "transposed" and values.ndim >= 3:
        memory = list(shape)
        memory[-3], memory[-2] = memory[-2], memory[-3]
        c = np.empty(memory, dtype).strides if all(shape) else (0,) * len(shape)
        strides = list(c)
        strides[-3], strides[-2] = c[-2], c[-3]
        out = guarded_empty(shape, dtype, tuple(strides), where)
    elif layout == "reversed" and values.ndim >= 2:
        c = np.empty(shape, dtype).strides
        out = guarded_empty(shape, dtype, c[:-2] + (-c[-2], -c[-1]), where)
    elif layout == "stepped":
        c = np.empty(shape[:-1] + (2 * shape[-1],), dtype).strides
        out = guarded_empty(shape, dtype, c[:-1] + (2 * item,), where)
    elif layout == "broadcast" and values.ndim >= 2:
        c = np.empty(shape, dtype).strides
        out = guarded_empty(shape, dtype, c[:-2] + (0, c[-1]), where)
        values = np.broadcast_to(values[..., :1, :], shape)
    else:
        out = guarded_empty(shape, dtype, None, where)
    out[...] = values
    return out


def guarded_broadcast_mask(values, full_shape, where="end"):
    """A mask of ``values``' shape broadcast to ``full_shape`` by zero strides, the small array guarded."""
    return np.broadcast_to(guarded_like(values, "contiguous", where), full_shape)


# ---------------------------------------------------------------------------------------------
# The worker (runs in a subprocess: python tests/test_guard_pages.py PATH)
# ---------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "transposed", "reversed", "stepped", "broadcast")
SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D, Dv): odd sizes, so vector loads straddle every row end
    (1, 1, 1, 1, 1, 1, 1),
    (1, 2, 1, 5, 13, 3, 7),
    (2, 2, 2, 13, 31, 17, 5),
    (1, 4, 2, 1, 77, 33, 16),  # decode: the head-dim-in-lanes layout
    (1, 1, 1, 40, 9, 64, 64),
]
TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}  # conftest's plain tolerances
ADDITIVE_REL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-14}  # tests/test_additive.py's


def _cases():
    rng = np.random.default_rng(2024)
    n = 0
    for dtype in (np.float32, np.float64):
        for shape in SHAPES:
            for layout in LAYOUTS:
                for where in ("end", "start"):
                    n += 1
                    mask_kind = ("bool", "float", "broadcast_bool", None)[n % 4]
                    causal = (False, True, "bottom_right")[n % 3]
                    yield dict(dtype=np.dtype(dtype), shape=shape, layout=layout, where=where, mask=mask_kind,
                               causal=causal, seed=int(rng.integers(2**31)))


def _inputs(case):
    rng = np.random.default_rng(case["seed"])
    b, hq, hkv, lq, lk, d, dv = case["shape"]
    dtype, layout, where = case["dtype"], case["layout"], case["where"]
    q = guarded_like(rng.standard_normal((b, hq, lq, d)).astype(dtype), layout, where)
    k = guarded_like(rng.standard_normal((b, hkv, lk, d)).astype(dtype), layout, where)
    v = guarded_like(rng.standard_normal((b, hkv, lk, dv)).astype(dtype), layout, where)
    mask = None
    if case["mask"] == "bool":
        mask = guarded_like(rng.random((b, hq, lq, lk)) < 0.8, "contiguous", where)
    elif case["mask"] == "float":
        m = rng.standard_normal((b, hq, lq, lk)).astype(dtype)
        m[rng.random(m.shape) < 0.2] = -np.inf
        mask = guarded_like(m, "reversed" if layout == "reversed" else "contiguous", where)
    elif case["mask"] == "broadcast_bool":  # (Lq, Lk) mask, zero strides over batch and heads
        mask = guarded_broadcast_mask(rng.random((lq, lk)) < 0.8, (b, hq, lq, lk), where)
    return q, k, v, mask


def _close(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, equal_nan=False, err_msg=what)


def _run_forward(case, fa, reference):
    q, k, v, mask = _inputs(case)
    b, hq, hkv, lq, lk, d, dv = case["shape"]
    out = guarded_empty((b, hq, lq, dv), case["dtype"], where=case["where"])
    _, lse = fa.attention(q, k, v, mask=mask, causal=case["causal"], return_lse=True, out=out)
    want, want_lse = reference.attention(np.array(q), np.array(k), np.array(v),
                                         mask=None if mask is None else np.array(mask), causal=case["causal"],
                                         return_lse=True)
    _close(out, want, TOL[case["dtype"]], "out")
    _close(lse, want_lse, TOL[case["dtype"]], "lse")


def _run_additive(case, fa, reference):
    q, k, v, mask = _inputs(case)
    b, hq, hkv, lq, lk, d, dv = case["shape"]
    w = guarded_like(np.random.default_rng(1).standard_normal(d).astype(case["dtype"]), "contiguous", case["where"])
    out = guarded_empty((b, hq, lq, dv), case["dtype"], where=case["where"])
    fa.additive_attention(q, k, v, score_weight=w, mask=mask, causal=case["causal"], out=out)
    want = reference.additive_attention(np.array(q), np.array(k), np.array(v), score_weight=np.array(w),
                                        mask=None if mask is None else np.array(mask), causal=case["causal"])
    _close(out, want, ADDITIVE_REL[case["dtype"]] * (10 + np.abs(w).sum()), "additive out")


def _run_weights(case, fa, reference):
    q, k, _, mask = _inputs(case)
    for kind in ("dot", "additive"):
        got = fa.attention_weights(q, k, mask=mask, causal=case["causal"], kind=kind)
        want = reference.attention_weights(np.array(q), np.array(k), mask=None if mask is None else np.array(mask),
                                           causal=case["causal"], kind=kind)
        tol = TOL[case["dtype"]] if kind == "dot" else ADDITIVE_REL[case["dtype"]] * (10 + q.shape[-1])
        _close(got, want, tol, f"weights ({kind})")


def _run_backward(case, fa, reference):
    q, k, v, mask = _inputs(case)
    out, lse = fa.attention(q, k, v, mask=mask, causal=case["causal"], return_lse=True)
    rng = np.random.default_rng(case["seed"] + 1)
    dout = guarded_like(rng.standard_normal(out.shape).astype(case["dtype"]), case["layout"], case["where"])
    out_g = guarded_like(out, "reversed" if case["layout"] == "reversed" else "contiguous", case["where"])
    lse_g = guarded_like(lse, "contiguous", case["where"])
    got = fa.attention_backward(dout, q, k, v, out_g, lse_g, mask=mask, causal=case["causal"])
    want = reference.attention_backward(np.array(dout), np.array(q), np.array(k), np.array(v), out, lse,
                                        mask=None if mask is None else np.array(mask), causal=case["causal"])
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        # Relative to the largest gradient, as tests/test_backward.py (sums of terms of both signs).
        scale = max(float(np.abs(np.asarray(w, np.float64)).max(initial=0.0)), 1.0)
        _close(np.asarray(g, np.float64) / scale, np.asarray(w, np.float64) / scale, TOL[case["dtype"]], name)
    # Additive backward: the reads and writes only (tests/test_backward.py judges its values).
    sw = guarded_like(np.ones(q.shape[-1], case["dtype"]), "contiguous", case["where"])
    out_a, lse_a = fa.additive_attention(q, k, v, score_weight=sw, mask=mask, causal=case["causal"], return_lse=True)
    fa.additive_attention_backward(guarded_like(out_a, "contiguous", case["where"]), q, k, v,
                                   guarded_like(out_a, "contiguous", case["where"]),
                                   guarded_like(lse_a, "contiguous", case["where"]), score_weight=sw, mask=mask,
                                   causal=case["causal"])


def _run_varlen(case, fa, reference):
    b, hq, hkv, lq, lk, d, dv = case["shape"]
    rng = np.random.default_rng(case["seed"])
    lengths_q, lengths_k = rng.integers(0, lq + 1, size=3), rng.integers(0, lk + 1, size=3)
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(x)]) for x in (lengths_q, lengths_k))
    layout = case["layout"] if case["layout"] != "transposed" else "contiguous"
    dtype, where = case["dtype"], case["where"]
    q = guarded_like(rng.standard_normal((cu_q[-1], hq, d)).astype(dtype), layout, where)
    k = guarded_like(rng.standard_normal((cu_k[-1], hkv, d)).astype(dtype), layout, where)
    v = guarded_like(rng.standard_normal((cu_k[-1], hkv, dv)).astype(dtype), layout, where)
    out = guarded_empty((cu_q[-1], hq, dv), dtype, where=where)
    causal = "bottom_right" if case["causal"] else False
    _, lse = fa.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, return_lse=True, out=out)
    want, want_lse = reference.attention_varlen(np.array(q), np.array(k), np.array(v), cu_q, cu_k, causal=causal,
                                                return_lse=True)
    _close(out, want, TOL[dtype], "varlen out")
    _close(lse, want_lse, TOL[dtype], "varlen lse")
    dout = guarded_like(rng.standard_normal(out.shape).astype(dtype), layout, where)
    fa.attention_varlen_backward(dout, q, k, v, guarded_like(out, "contiguous", where),
                                 guarded_like(lse, "contiguous", where), cu_q, cu_k, causal=causal)


def _run_half_forward(case, fa, reference):
    """16-bit inputs: widened element by element, or (bfloat16 on the avx512bf16 path) read in 32-bit pairs
    of K and Q and 32-word masked loads of V rows, the pair layouts that could stray past a row's end."""
    import ml_dtypes

    dtype = np.dtype(ml_dtypes.bfloat16) if case["seed"] % 2 else np.dtype(np.float16)
    case = dict(case, dtype=dtype, mask="bool" if case["mask"] == "float" else case["mask"])  # float masks are f32
    q, k, v, mask = _inputs(case)
    b, hq, hkv, lq, lk, d, dv = case["shape"]
    out = guarded_empty((b, hq, lq, dv), dtype, where=case["where"])
    fa.attention(q, k, v, mask=mask, causal=case["causal"], out=out)
    want = reference.attention(*(np.array(x, np.float64) for x in (q, k, v)),
                               mask=None if mask is None else np.array(mask), causal=case["causal"])
    # Two roundings of half an ulp (P to bfloat16 on the paired path, the output) on outputs that are convex
    # combinations of the values: within 2 eps of the largest value.
    eps = float(ml_dtypes.finfo(dtype).eps)
    _close(out, want, 2 * eps * max(float(np.abs(np.asarray(v, np.float64)).max(initial=0)), 1.0), "half out")


def _run_float32_high(case, fa, reference):
    """float32 with precision="high": on the amx level the tile path (K / V panels, Q^T and P^T pairs, the
    partial last key chunk of V copied, never read in place); elsewhere the fp32 path."""
    q, k, v, mask = _inputs(dict(case, dtype=np.dtype(np.float32)))
    b, hq, hkv, lq, lk, d, dv = case["shape"]
    out = guarded_empty((b, hq, lq, dv), np.float32, where=case["where"])
    fa.attention(q, k, v, mask=mask, causal=case["causal"], out=out, precision="high")
    want = reference.attention(np.array(q), np.array(k), np.array(v), mask=None if mask is None else np.array(mask),
                               causal=case["causal"])
    _close(out, want, 5e-5, "float32 high out")  # bf16x3 keeps ~16 bits: tests/test_amx.py


PATHS = {"forward": _run_forward, "additive": _run_additive, "weights": _run_weights, "backward": _run_backward,
         "varlen": _run_varlen, "half_forward": _run_half_forward, "float32_high": _run_float32_high}


def worker(path):
    import warnings

    import fusedattn as fa
    from fusedattn import reference

    warnings.simplefilter("error")  # as the suite's filterwarnings = error
    count = 0
    for case in _cases():
        print(f"case {count}: {path} {case}", flush=True)
        PATHS[path](case, fa, reference)
        count += 1
    print(f"ok: {count} cases on {fa.backend_info()['isa']}", flush=True)


# ---------------------------------------------------------------------------------------------
# The tests (in the pytest process)
# ---------------------------------------------------------------------------------------------

def test_guard_pages_fault():
    """The harness itself: the array's last byte is readable, the next one faults (SIGSEGV)."""
    for where, first_ok, then_bad in (("end", "p + a.nbytes - 1", "p + a.nbytes"), ("start", "p", "p - 1")):
        code = ("import sys, ctypes; sys.path.insert(0, %r); import test_guard_pages as g, numpy as np; "
                "a = g.guarded_empty((3, 5), np.float32, where=%r); a[...] = 1; p = a.ctypes.data; "
                "print(ctypes.c_char.from_address(%s).value, flush=True); "
                "print(ctypes.c_char.from_address(%s).value, flush=True)" % (HERE, where, first_ok, then_bad))
        # The child faults on purpose and never loads fusedattn: keep a sanitizer runtime inherited from a
        # scripts/sanitize.sh run out of it, or ASan would log the intended SEGV as a finding.
        env = {name: value for name, value in os.environ.items()
               if name not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        # float32 1.0 is 0x3f800000: its little-endian last byte is 0x3f ('?'), its first 0x00.
        assert proc.stdout.split() == (["b'?'"] if where == "end" else ["b'\\x00'"]), proc.stdout + proc.stderr
        assert proc.returncode != 0, f"reading past the {where} did not fault: the tests below would prove nothing"


# Every ISA name, skipped at run time where unavailable: this module must import without fusedattn, as
# the harness test's child process imports it for guarded_empty alone.
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512bf16", "amx", "amx-model"])
def test_no_access_outside_the_arrays(isa, path):
    from conftest import amx_model_available, subprocess_env
    from fusedattn import _backend

    if not _backend.HAVE_EXTENSION:
        pytest.skip("fusedattn's compiled extension is not importable")
    env = {"FUSEDATTN_ISA": isa}
    if isa == "amx-model":  # the amx level on the software model of the tiles
        if not amx_model_available():
            pytest.skip("the AMX software model needs the amx level compiled in and the avx512 level")
        env = {"FUSEDATTN_ISA": "amx", "FUSEDATTN_AMX_EMULATION": "1"}
    elif isa not in _backend.available_isas():
        pytest.skip(f"ISA {isa!r} is not compiled into this build or not supported by this CPU")
    if path == "half_forward":
        pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes: pip install ml_dtypes")

    proc = subprocess.run([sys.executable, os.path.abspath(__file__), path], capture_output=True, text=True,
                          timeout=600, env=subprocess_env(**env), cwd=HERE)
    last_case = [line for line in proc.stdout.splitlines() if line.startswith("case ")][-1:]
    assert proc.returncode == 0, (
        f"{path} on {isa} exited with {proc.returncode} (negative: killed by that signal; -11 is SIGSEGV, a "
        f"read or write outside an array) during {last_case}\nstderr:\n{proc.stderr[-3000:]}")
    assert proc.stdout.strip().splitlines()[-1].startswith("ok:"), proc.stdout[-2000:]
    assert f"on {env['FUSEDATTN_ISA']}" in proc.stdout.splitlines()[-1]


if __name__ == "__main__":
    worker(sys.argv[1])
