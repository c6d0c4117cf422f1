"""The cost of going through Dask: fusedattn.dask.attention (threaded scheduler) vs one direct call.

Rows (float32, 1 x 16 heads x 2048 x 2048 x 64, non-causal: ~17 GFLOP, each block >= ~50 ms of
single-core work):

* ``direct``: one ``fusedattn.attention`` call on the NumPy arrays (the kernel's own OpenMP threads).
* ``heads2`` / ``heads4``: the heads split into 2 / 4 Dask blocks, one task each; the threaded scheduler
  runs them concurrently. ``kt=all``: each task's kernel uses all threads (tasks x threads OpenMP threads
  in all); ``kt=1``: one kernel thread per task, Dask's threads fill the cores.
* ``keys4``: the keys split into 4 blocks (all heads in each): 4 partials per query row, packed with their
  lse and merged by ``merge_attention`` in Dask's tree: the cost of sequence parallelism.
* ``causal-direct`` / ``causal-blocks4x4``: causal (top-left); q, k and v in 4 blocks of 512 along the
  sequence: the 6 blocks above the diagonal are no task, so 10 kernel calls do the direct call's work
  (issue #14: 136 ms against 54 ms for the direct call when all 16 blocks were calls).

``extra_info``: ``ms`` (best round), ``overhead_pct`` = (best dask / best direct - 1) x 100 and
``overhead_pct_median_pair`` (the median over pairs), from 7 pairs of one direct call then one Dask call
timed back to back in the row itself, so that a machine whose speed drifts (shared cores, turbo) is
compared with itself; ``blocks``, ``tasks`` (graph size), ``graph_build_ms`` (building the lazy array:
not in the timed call) and ``threads``.

    PYTHONPATH=... python -m pytest benchmarks/test_dask_speed.py --benchmark-only -q

``--attn-threads N`` sets the threads (kernel and Dask workers; default fusedattn.get_num_threads()).
``--benchmark-disable`` runs each row once, checked against the direct call, without timing.
"""
import time

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark: pip install fusedattn[bench]")
da = pytest.importorskip("dask.array", reason="needs dask: pip install 'fusedattn[dask]'")

import fusedattn  # noqa: E402  (after the skips)
import fusedattn.dask  # noqa: E402

SHAPE = (1, 16, 2048, 64)
# (label, q/k/v chunks, kernel threads per task: None = all, causal)
ROWS = [
    ("direct", None, None, False),
    ("heads2-kt=all", (1, 8, -1, -1), None, False),
    ("heads2-kt=1", (1, 8, -1, -1), 1, False),
    ("heads4-kt=all", (1, 4, -1, -1), None, False),
    ("heads4-kt=1", (1, 4, -1, -1), 1, False),
    ("keys4-kt=all", (1, -1, 512, -1), None, False),
    ("causal-direct", None, None, True),
    ("causal-blocks4x4-kt=all", (1, -1, 512, -1), None, True),
]


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(3))


@pytest.mark.parametrize(("label", "chunks", "kernel_threads", "causal"), ROWS, ids=[r[0] for r in ROWS])
def test_dask_speed(benchmark, inputs, threads, label, chunks, kernel_threads, causal):
    q, k, v = inputs
    direct = lambda: fusedattn.attention(q, k, v, causal=causal, num_threads=threads)  # noqa: E731
    want = direct()
    if chunks is None:
        run = direct
        info = dict(blocks=1, tasks=0, graph_build_ms=0.0)
    else:
        start = time.perf_counter()
        lazy = fusedattn.dask.attention(*(da.from_array(x, chunks=chunks) for x in (q, k, v)),
                                        causal=causal, num_threads=kernel_threads or threads)
        info = dict(blocks=int(np.prod(da.from_array(q, chunks=chunks).numblocks)), tasks=len(lazy.__dask_graph__()),
                    graph_build_ms=(time.perf_counter() - start) * 1e3)
        run = lambda: lazy.compute(scheduler="threads", num_workers=threads)  # noqa: E731
    benchmark.group = "dask 1x16x2048x2048x64" + (" causal" if causal else "")
    benchmark.extra_info.update(label=label, threads=threads, **info)
    if not benchmark.enabled:
        got = benchmark.pedantic(run)  # --benchmark-disable: a single call, no timing
    else:
        got = run()
    # The tests' float32 tolerance (tests/conftest.py): head blocks are the same computation, key blocks merge.
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    if not benchmark.enabled:
        return
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["ms"] = benchmark.stats.stats.min * 1e3
    if chunks is None:
        return
    pairs = np.array([(_seconds(direct), _seconds(run)) for _ in range(7)])
    benchmark.extra_info["overhead_pct"] = (pairs[:, 1].min() / pairs[:, 0].min() - 1) * 100
    benchmark.extra_info["overhead_pct_median_pair"] = (np.median(pairs[:, 1] / pairs[:, 0]) - 1) * 100


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
