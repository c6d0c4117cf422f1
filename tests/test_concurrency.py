"""Thread safety and determinism.

* Python threads: the kernels release the GIL and keep no global mutable state besides the selected
  ISA, so 8 Python threads calling at once (each with its own OpenMP team) must get bit-identical
  results to the same calls made one after another.
* The GIL really is released: another Python thread makes progress while a long call runs.
* Thread counts: the backward pass splits work by (batch, kv head, key chunk) with a chunk count that
  depends on the shape only, so its gradients are bit-identical at any ``num_threads``. The forward
  splits query rows across threads, which never changes a row's arithmetic, *except* for the
  flash-decoding path: when there are fewer row blocks than ~2x the threads (one query row per kv head,
  as in decoding), the keys are split into a number of chunks that depends on the thread count and the
  partial results are merged by their logsumexp, so the rounding differs (measured on the development
  machine for B = Hkv = Lq = 1, Lk = 8192, D = 128: max |difference| 1.4e-7 scalar, 1.0e-7 AVX2,
  8.6e-8 AVX-512, about 2e-6 of max |out|). Those shapes are checked to be reproducible at a fixed
  thread count and close across thread counts; every other shape is checked bit for bit.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import fusedattn
from conftest import assert_close, make_qkv

THREAD_COUNTS = (1, 2, 3, 4)  # 3 and 4 oversubscribe a 2-core machine: still the same answer


def forward(case, num_threads):
    return fusedattn.attention(case["q"], case["k"], case["v"], mask=case.get("mask"), causal=case.get("causal", False),
                               return_lse=True, num_threads=num_threads)


def backward(case, num_threads):
    out, lse = forward(case, 1)
    return fusedattn.attention_backward(case["dout"], case["q"], case["k"], case["v"], out, lse, mask=case.get("mask"),
                                        causal=case.get("causal", False), num_threads=num_threads)


def make_case(rng, b, hq, hkv, lq, lk, d, dv=None, dtype=np.float32, causal=False, mask=False):
    q, k, v = make_qkv(rng, lq, lk, d, dv or d, batch=(b,), hq=hq, hkv=hkv, dtype=dtype)
    case = {"q": q, "k": k, "v": v, "causal": causal,
            "dout": rng.standard_normal(q.shape[:-1] + (v.shape[-1],)).astype(dtype)}
    if mask:
        case["mask"] = rng.random((lq, lk)) < 0.8
    return case


# Shapes with enough work (>= 2^21 multiply-adds) that the kernels really use 2+ threads, and enough
# row blocks that the forward never splits keys.
ROW_SPLIT_SHAPES = {
    "prefill": dict(b=2, hq=4, hkv=4, lq=192, lk=192, d=64),
    "gqa_causal": dict(b=1, hq=8, hkv=2, lq=160, lk=200, d=32, causal="bottom_right"),
    "mask_dv": dict(b=1, hq=4, hkv=1, lq=130, lk=257, d=48, dv=24, mask=True),
    "float64": dict(b=1, hq=4, hkv=2, lq=128, lk=128, d=64, dtype=np.float64),
    "decode_many_heads": dict(b=1, hq=32, hkv=32, lq=1, lk=2048, d=128),
}
# One row block against many keys: the forward splits the keys across threads (flash-decoding).
KEY_SPLIT_SHAPES = {
    "decode_one_head": dict(b=1, hq=1, hkv=1, lq=1, lk=8192, d=128),
    "decode_gqa": dict(b=1, hq=8, hkv=1, lq=1, lk=4096, d=64),
}


@pytest.fixture(scope="module")
def cases():
    rng = np.random.default_rng(1234)
    return {name: make_case(rng, **shape) for name, shape in {**ROW_SPLIT_SHAPES, **KEY_SPLIT_SHAPES}.items()}


def assert_identical(a, b, what):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, what
        assert np.array_equal(x, y, equal_nan=True), f"{what}: not bit-identical (max |diff| {np.abs(x - y).max():.3g})"


@pytest.mark.parametrize("name", sorted(ROW_SPLIT_SHAPES))
def test_forward_bit_identical_across_thread_counts(isa, cases, name):
    first = forward(cases[name], 1)
    for threads in THREAD_COUNTS:
        for _ in range(2):  # and across runs: dynamic scheduling must not change any result
            assert_identical(forward(cases[name], threads), first, f"{name}, num_threads={threads}")


@pytest.mark.parametrize("name", sorted(KEY_SPLIT_SHAPES))
def test_forward_key_split_reproducible_and_close(isa, cases, name):
    serial = forward(cases[name], 1)
    for threads in THREAD_COUNTS:
        first = forward(cases[name], threads)
        assert_identical(forward(cases[name], threads), first, f"{name}, num_threads={threads}, second run")
        # Different key chunks round differently; conftest's tolerance (a few ulps of headroom x 40)
        # still applies: the merge is exact up to one rescale per chunk.
        assert_close(first[0], serial[0], f"{name}: out, {threads} vs 1 threads")
        assert_close(first[1], serial[1], f"{name}: lse, {threads} vs 1 threads")


@pytest.mark.parametrize("name", sorted({**ROW_SPLIT_SHAPES, **KEY_SPLIT_SHAPES}))
def test_backward_bit_identical_across_thread_counts(isa, cases, name):
    first = backward(cases[name], 1)
    for threads in THREAD_COUNTS:
        for _ in range(2):
            assert_identical(backward(cases[name], threads), first, f"{name}, num_threads={threads}")


def test_varlen_backward_bit_identical_across_thread_counts(isa):
    rng = np.random.default_rng(7)
    lengths_q, lengths_k = [1, 130, 0, 77], [300, 130, 5, 1]
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(x)]) for x in (lengths_q, lengths_k))
    q = rng.standard_normal((cu_q[-1], 4, 64)).astype(np.float32)
    k = rng.standard_normal((cu_k[-1], 2, 64)).astype(np.float32)
    v = rng.standard_normal((cu_k[-1], 2, 64)).astype(np.float32)
    out, lse = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, causal="bottom_right", return_lse=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = [fusedattn.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal="bottom_right",
                                                 num_threads=t) for t in THREAD_COUNTS]
    for threads, g in zip(THREAD_COUNTS, grads):
        assert_identical(g, grads[0], f"varlen backward, num_threads={threads}")


def run_in_threads(fn, args_per_thread, repeats=3):
    """Run fn(*args) for every entry of args_per_thread, all in their own thread at once; returns the
    results of every repeat, per thread. Exceptions in a thread are re-raised here."""
    barrier = threading.Barrier(len(args_per_thread))
    results = [None] * len(args_per_thread)
    errors = []

    def worker(i, args):
        try:
            barrier.wait(timeout=60)
            results[i] = [fn(*args) for _ in range(repeats)]
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, args)) for i, args in enumerate(args_per_thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]
    return results


def test_eight_python_threads_match_serial_calls(isa, cases):
    names = sorted(cases)
    # 8 threads over the cases: forward and backward, 1 and 2 OpenMP threads each, distinct inputs.
    jobs = [(names[i % len(names)], "forward" if i % 2 == 0 else "backward", 1 + (i // 2) % 2) for i in range(8)]

    def run(name, kind, threads):
        return (forward if kind == "forward" else backward)(cases[name], threads)

    serial = [run(*job) for job in jobs]
    parallel = run_in_threads(run, jobs)
    for (name, kind, threads), expected, runs in zip(jobs, serial, parallel):
        for result in runs:
            assert_identical(result, expected, f"{kind} {name}, num_threads={threads}, in 8 concurrent threads")


def test_concurrent_calls_with_shared_inputs_and_separate_outputs(isa, cases):
    # The same read-only inputs from every thread, each writing its own out= array.
    case = cases["prefill"]
    for x in (case["q"], case["k"], case["v"]):
        x.flags.writeable = False
    try:
        expected = fusedattn.attention(case["q"], case["k"], case["v"], num_threads=2)
        outs = [np.empty_like(expected) for _ in range(8)]
        run_in_threads(lambda out: fusedattn.attention(case["q"], case["k"], case["v"], out=out, num_threads=2),
                       [(out,) for out in outs], repeats=2)
        for out in outs:
            assert np.array_equal(out, expected)
    finally:
        for x in (case["q"], case["k"], case["v"]):
            x.flags.writeable = True


def test_gil_is_released_during_a_call():
    """The calling thread is never stalled for long while a kernel call runs in another thread.

    A C function that holds the GIL stalls every other Python thread for its whole duration (the
    interpreter's switch interval cannot preempt it): measured with ``sorted`` of 1.5M floats, a stall
    of ~0.29 s for a 0.30 s call. With the GIL released the longest stall is the handover around the
    call (~5-10 ms, the switch interval), measured ~8 ms for a ~0.2 s call on 2 cores.
    """
    rng = np.random.default_rng(0)
    q, k, v = make_qkv(rng, 2048, 2048, 64, batch=(1,), hq=8)
    fusedattn.attention(q[..., :64, :], k, v, num_threads=1)  # warm up: page in the inputs and the code
    state = {"done": False, "duration": 0.0}

    def caller():
        start = time.perf_counter()
        fusedattn.attention(q, k, v, num_threads=1)
        state["duration"] = time.perf_counter() - start
        state["done"] = True

    thread = threading.Thread(target=caller)
    last = time.perf_counter()
    longest_stall = 0.0
    thread.start()
    while not state["done"]:
        now = time.perf_counter()
        longest_stall = max(longest_stall, now - last)
        last = now
    thread.join()
    assert state["duration"] > 0.02, "the call was too short to tell anything (a much faster machine?)"
    assert longest_stall < 0.5 * state["duration"], (
        f"this thread stalled {longest_stall * 1e3:.1f} ms during a {state['duration'] * 1e3:.1f} ms call: "
        "the GIL is held while the kernel runs")
