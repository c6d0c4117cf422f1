"""fusedattn.dask.attention: lazy attention over Dask arrays equals one direct fusedattn.attention call.

Every chunking pattern (batch, heads, Lq, Lk, uneven and mixed), bool / float / broadcast / Dask masks,
both causal alignments, windows, ALiBi, grouped-query heads and 2-D / 3-D inputs, on the synchronous
scheduler (deterministic, and the graph is the same for every scheduler), plus the threaded, processes and
dask.distributed (LocalCluster on loopback) schedulers. Also: the graph holds O(blocks) tasks and no task
result is anywhere near Lq x Lk; nothing is computed before .compute(); bad chunkings raise ValueError.

Tolerances: conftest's (float32 2e-5, float64 1e-12), against the direct call on the same NumPy data.
Blocks along batch / heads / Lq are the very same kernel computations; blocks along Lk add the merge
(a convex combination of partials: ~(n + 2) eps * max|out|, see tests/test_merge.py), far inside them.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="fusedattn.dask needs dask: pip install 'fusedattn[dask]'")
dask = pytest.importorskip("dask")

import fusedattn  # noqa: E402  (after the skip)
import fusedattn.dask as fdask  # noqa: E402
from dask.callbacks import Callback  # noqa: E402

from conftest import HALF_DTYPE_PARAMS, PYTHON, assert_dead_rows, subprocess_env, tol  # noqa: E402

B, HQ, HKV, LQ, LK, D, DV = 2, 4, 2, 48, 80, 16, 12
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dask_long_context.py"

# (q chunks, k chunks) over (B, Hq, Lq, D) and (B, Hkv, Lk, D); v follows k. -1: one chunk.
CHUNKINGS = {
    "single": ((-1, -1, -1, -1), (-1, -1, -1, -1)),
    "batch": ((1, -1, -1, -1), (1, -1, -1, -1)),
    "heads": ((-1, 2, -1, -1), (-1, 1, -1, -1)),
    "lq": ((-1, -1, (5, 30, 13), -1), (-1, -1, -1, -1)),
    "lk": ((-1, -1, -1, -1), (-1, -1, (33, 47), -1)),
    "lk_uneven_many": ((-1, -1, -1, -1), (-1, -1, (1, 9, 20, 2, 8, 8, 8, 8, 8, 8), -1)),  # 10 partials: a 2-level merge tree
    # k's batch / head chunks differ from q's: k and v are rechunked to q's.
    "mixed": ((1, 2, 13, -1), (-1, -1, 25, -1)),
}
MASKS = ["none", "bool_heads_broadcast", "float_2d"]
CAUSALS = [False, True, "bottom_right"]


def make_inputs(rng, dtype=np.float32, lq=LQ, lk=LK):
    q = rng.standard_normal((B, HQ, lq, D)).astype(dtype)
    k = rng.standard_normal((B, HKV, lk, D)).astype(dtype)
    v = rng.standard_normal((B, HKV, lk, DV)).astype(dtype)
    return q, k, v


def make_mask(rng, kind, lq=LQ, lk=LK):
    if kind == "none":
        return None
    if kind == "bool_heads_broadcast":
        mask = rng.random((B, 1, lq, lk)) < 0.6
        mask[:, :, 3] = False  # a row that attends nothing: 0 and -inf through the merge
        return mask
    if kind == "float_2d":
        mask = rng.standard_normal((lq, lk)).astype(np.float32)
        mask[rng.random((lq, lk)) < 0.3] = -np.inf
        return mask
    raise AssertionError(kind)


def chunked(x, chunks):
    return da.from_array(x, chunks=chunks)


def compare(got, q, k, v, **kwargs):
    """``got`` (out, lse) Dask arrays, computed, against the direct call on the NumPy data."""
    out, lse = dask.compute(*got)
    want, want_lse = fusedattn.attention(q, k, v, return_lse=True, **kwargs)
    dtype = q.dtype
    assert out.dtype == dtype and lse.dtype == dtype
    assert out.shape == want.shape and lse.shape == want_lse.shape
    np.testing.assert_allclose(out, want, err_msg="out", **tol(dtype))
    np.testing.assert_allclose(lse, want_lse, err_msg="lse", **tol(dtype))
    assert_dead_rows(out, lse, want_lse)
    return out, lse


def run_case(rng, chunking, mask_kind, causal, dtype=np.float32):
    q, k, v = make_inputs(rng, dtype)
    mask = make_mask(rng, mask_kind)
    qc, kc = CHUNKINGS[chunking]
    got = fdask.attention(chunked(q, qc), chunked(k, kc), chunked(v, kc[:-1] + (-1,)), mask=mask, causal=causal,
                          return_lse=True)
    assert got[0].chunks[:3] == chunked(q, qc).chunks[:3]  # q's blocks are the output's blocks
    compare(got, q, k, v, mask=mask, causal=causal)


@pytest.mark.parametrize("causal", CAUSALS, ids=["none", "top_left", "bottom_right"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_equals_direct_call_synchronous(rng, chunking, mask_kind, causal):
    with dask.config.set(scheduler="synchronous"):
        run_case(rng, chunking, mask_kind, causal)


@pytest.mark.parametrize("causal", CAUSALS, ids=["none", "top_left", "bottom_right"])
@pytest.mark.parametrize("chunking", ["mixed", "lk_uneven_many"])
def test_equals_direct_call_threads(rng, chunking, causal):
    with dask.config.set(scheduler="threads", num_workers=4):
        run_case(rng, chunking, "bool_heads_broadcast", causal)


def test_float64(rng):
    with dask.config.set(scheduler="synchronous"):
        run_case(rng, "mixed", "float_2d", "bottom_right", dtype=np.float64)


@pytest.mark.parametrize("dtype", HALF_DTYPE_PARAMS)
@pytest.mark.parametrize("out_dtype", [None, np.float32], ids=["out16", "out32"])
def test_16bit_inputs(rng, dtype, out_dtype):
    """16-bit q/k/v: partials are kept and merged in float32 and rounded once, like the direct float32 call.

    The comparison is the direct call with float32 output, rounded to 16 bits once (a direct bfloat16-output
    call may instead round P to bfloat16 on the avx512bf16 path); the merged float32 value differs from it
    by ~1e-7 relative, so the two can land 1 ulp apart: rtol = 2^-10 (float16) / 2^-7 (bfloat16), atol 1e-6
    for float16 subnormals. With out_dtype=float32 both are float32: conftest's 2e-5. On the amx level float16
    runs on the tiles as three bfloat16 products (hi.hi + hi.lo + lo.hi, lo.lo dropped: 2^-16 relative per
    term), so each result is off by up to ~2 * 2^-16 * max|v| (the probabilities sum to 1) in its own way, and
    an output near zero can differ by more than its ulp: atol = 4 * 2^-16 * max|v| there.
    """
    q, k, v = (x.astype(dtype) for x in make_inputs(rng))
    mask = make_mask(rng, "float_2d")
    got = fdask.attention(chunked(q, (1, 2, 20, -1)), chunked(k, (-1, -1, 30, -1)), chunked(v, (-1, -1, 30, -1)),
                          mask=mask, causal="bottom_right", return_lse=True, out_dtype=out_dtype)
    with dask.config.set(scheduler="synchronous"):
        out, lse = dask.compute(*got)
    want, want_lse = fusedattn.attention(q, k, v, mask=mask, causal="bottom_right", return_lse=True,
                                         out_dtype=np.float32)
    want = want.astype(out.dtype)
    assert out.dtype == (dtype if out_dtype is None else np.float32)
    assert lse.dtype == want_lse.dtype == np.float32
    ulp = {np.dtype(np.float16): 2.0 ** -10}.get(np.dtype(dtype), 2.0 ** -7)
    atol = 1e-6
    if fusedattn.backend_info()["isa"] == "amx" and np.dtype(dtype) == np.float16:
        atol = 4 * 2.0**-16 * float(np.abs(v.astype(np.float32)).max())
    out_tol = tol(np.float32) if out_dtype is not None else dict(rtol=ulp, atol=atol)
    np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), **out_tol)
    np.testing.assert_allclose(lse, want_lse, **tol(np.float32))


@pytest.mark.parametrize(("lq", "lk"), [(70, 30), (30, 70), (1, 70)], ids=["lq_gt_lk", "lq_lt_lk", "decode"])
@pytest.mark.parametrize("causal", [True, "bottom_right"], ids=["top_left", "bottom_right"])
def test_causal_alignment_uses_the_whole_arrays(rng, lq, lk, causal):
    """Lq > Lk bottom-right leaves the first Lq - Lk rows with no key (0 / -inf) in every block."""
    q, k, v = make_inputs(rng, lq=lq, lk=lk)
    got = fdask.attention(chunked(q, (1, 2, 16, -1)), chunked(k, (-1, -1, 9, -1)), chunked(v, (-1, -1, 9, -1)),
                          causal=causal, return_lse=True)
    with dask.config.set(scheduler="synchronous"):
        compare(got, q, k, v, causal=causal)


def test_window_alibi_softcap(rng):
    q, k, v = make_inputs(rng)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625])
    cases = [dict(window=(10, 3)), dict(causal=True, window=(20, None), alibi_slopes=slopes),
             dict(causal="bottom_right", alibi_slopes=np.tile(slopes, (B, 1)) * [[1.0], [2.0]], softcap=2.0)]
    with dask.config.set(scheduler="synchronous"):
        for kwargs in cases:
            got = fdask.attention(chunked(q, (1, 2, 11, -1)), chunked(k, (-1, -1, 17, -1)),
                                  chunked(v, (-1, -1, 17, -1)), return_lse=True, **kwargs)
            compare(got, q, k, v, **kwargs)


@pytest.mark.parametrize("mask_shape", [(LK,), (B, HQ, LQ, LK), (HQ, 1, LK), (B, 1, 1, 1)],
                         ids=["keys_only", "full", "heads_keys", "scalar_per_batch"])
def test_dask_masks_are_rechunked_to_the_blocks(rng, mask_shape):
    q, k, v = make_inputs(rng)
    mask = rng.random(mask_shape) < 0.7
    # Chunked unlike q and k on purpose (where an axis is not broadcast).
    dmask = da.from_array(mask, chunks=tuple(max(1, (s + 2) // 3) for s in mask_shape))
    got = fdask.attention(chunked(q, (1, 2, 20, -1)), chunked(k, (-1, -1, 30, -1)), chunked(v, (-1, -1, 30, -1)),
                          mask=dmask, causal="bottom_right", return_lse=True)
    with dask.config.set(scheduler="synchronous"):
        compare(got, q, k, v, mask=mask, causal="bottom_right")


@pytest.mark.parametrize("rank", [2, 3])
def test_2d_and_3d_inputs(rng, rank):
    q, k, v = make_inputs(rng)
    q, k, v = (x[0, 0] if rank == 2 else x[:, 0] for x in (q, k, v))
    mask = rng.random(q.shape[:-1] + (LK,)) < 0.8
    lead = () if rank == 2 else (1,)
    got = fdask.attention(chunked(q, lead + (10, -1)), chunked(k, lead + (25, -1)), chunked(v, lead + (25, -1)),
                          mask=da.from_array(mask, chunks=lead + (7, 40)), causal="bottom_right", return_lse=True)
    assert got[0].shape == q.shape[:-1] + (DV,) and got[1].shape == q.shape[:-1]
    with dask.config.set(scheduler="synchronous"):
        compare(got, q, k, v, mask=mask, causal="bottom_right")


def test_grouped_query_heads(rng):
    """Hq = 8 over Hkv = 2 (groups of 4): q head chunks of 4 or 8 map onto whole kv heads."""
    q = rng.standard_normal((1, 8, 20, D)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 30, D)).astype(np.float32) for _ in range(2))
    with dask.config.set(scheduler="synchronous"):
        for head_chunk in (4, 8):
            got = fdask.attention(chunked(q, (1, head_chunk, 7, -1)), chunked(k, (1, 2, 11, -1)),
                                  chunked(v, (1, 1, 11, -1)), causal=True, return_lse=True)
            compare(got, q, k, v, causal=True)


def test_numpy_inputs_and_no_lse(rng):
    q, k, v = make_inputs(rng)
    out = fdask.attention(q, k, v, causal=True)  # NumPy in: one chunk each
    assert isinstance(out, da.Array) and out.numblocks == (1, 1, 1, 1)
    np.testing.assert_allclose(out.compute(scheduler="synchronous"), fusedattn.attention(q, k, v, causal=True),
                               **tol(np.float32))
    out = fdask.attention(q, chunked(k, (-1, -1, 20, -1)), chunked(v, (-1, -1, 20, -1)), causal=True)
    np.testing.assert_allclose(out.compute(scheduler="synchronous"), fusedattn.attention(q, k, v, causal=True),
                               **tol(np.float32))


# ---------------------------------------------------------------------------------------------
# Graph: lazy, O(blocks) tasks, no Lq x Lk intermediate
# ---------------------------------------------------------------------------------------------

class _Results(Callback):
    """Records the size of every task's result (synchronous or threaded scheduler)."""

    def __init__(self):
        super().__init__()
        self.nbytes = []

    def _posttask(self, key, result, dsk, state, worker_id):
        if isinstance(result, np.ndarray):
            self.nbytes.append(result.nbytes)


@pytest.mark.parametrize("blocks", [(2, 4), (8, 16)], ids=["4x8_blocks", "16x32_blocks"])
def test_graph_is_linear_in_blocks_and_holds_no_score_matrix(rng, blocks):
    lq = lk = 1024
    nq, nk = blocks
    q = da.from_array(rng.standard_normal((1, 2, lq, 8)).astype(np.float32), chunks=(1, 1, lq // nq, 8))
    k = da.from_array(rng.standard_normal((1, 2, lk, 8)).astype(np.float32), chunks=(1, 1, lk // nk, 8))
    v = da.from_array(rng.standard_normal((1, 2, lk, 8)).astype(np.float32), chunks=(1, 1, lk // nk, 8))
    out, lse = fdask.attention(q, k, v, causal=True, return_lse=True)
    partials = 2 * nq * nk  # (heads) x (query blocks) x (key blocks): one kernel call each
    inputs = q.npartitions + k.npartitions + v.npartitions
    graph = dict(out.__dask_graph__())
    graph.update(lse.__dask_graph__())
    # Per partial: the call and its share of the merge tree; per output block: the out / lse slices; plus
    # the input blocks. Measured 62 and 696 tasks here: 1.7x and 2.1x (partials + input blocks).
    assert len(graph) <= 4 * (partials + inputs), (len(graph), partials, inputs)
    results = _Results()
    with results, dask.config.set(scheduler="synchronous"):
        got_out, got_lse = dask.compute(out, lse)
    # A score matrix would be lq * lk * 4 bytes = 4 MiB per head; the largest task result is an input
    # block or the whole 64 KiB input a block is sliced from.
    assert results.nbytes and max(results.nbytes) <= q.nbytes
    np.testing.assert_allclose(got_out, fusedattn.attention(*dask.compute(q, k, v), causal=True), **tol(np.float32))


def partial_tasks(*arrays):
    """The kernel calls in the graphs of ``arrays``: the tasks named fusedattn-partial-<token>."""
    graph = {}
    for x in arrays:
        graph.update(x.__dask_graph__())
    return sum(1 for key in graph if isinstance(key, tuple) and key[0].startswith("fusedattn-partial-"))


def seen_blocks(q_chunks, k_chunks, lq, lk, causal=False, window=None):
    """(query block, key block) pairs where some query may see some key, from the dense pattern of the docs."""
    rows, cols = np.arange(lq)[:, None], np.arange(lk)[None, :]
    diagonal = rows + (0 if causal is True else lk - lq)
    left, right = (None, None) if window is None else window
    allowed = np.ones((lq, lk), bool)
    if causal is not False:
        allowed &= cols <= diagonal
    if left is not None:
        allowed &= cols >= diagonal - left
    if right is not None:
        allowed &= cols <= diagonal + right
    q_bounds, k_bounds = np.cumsum((0,) + q_chunks), np.cumsum((0,) + k_chunks)
    return np.array([[allowed[q0:q1, k0:k1].any() for k0, k1 in zip(k_bounds[:-1], k_bounds[1:])]
                     for q0, q1 in zip(q_bounds[:-1], q_bounds[1:])], dtype=bool).reshape(len(q_chunks), len(k_chunks))


# (lq, lk, q's Lq chunk, k's Lk chunk, keyword arguments)
PRUNING_CASES = {
    "causal_square": (64, 64, 16, 16, dict(causal=True)),  # 4 x 4 blocks, 10 on or below the diagonal
    "causal_bottom_right": (LQ, LK, 13, 25, dict(causal="bottom_right")),
    "causal_top_left_lq_lt_lk": (LQ, LK, 13, 25, dict(causal=True)),  # keys 48.. are seen by no query
    "window": (LQ, LK, 11, 17, dict(window=(10, 3))),
    "causal_window": (LQ, LK, 11, 9, dict(causal=True, window=(20, None))),
    # Lq > Lk, bottom-right: the first 40 queries see no key, so whole query blocks have no visible key block.
    "nothing_visible_causal": (70, 30, 16, 9, dict(causal="bottom_right")),
    "nothing_visible_window": (70, 30, 16, 9, dict(window=(2, 0))),
}


@pytest.mark.parametrize("return_lse", [True, False], ids=["lse", "out_only"])
@pytest.mark.parametrize("case", list(PRUNING_CASES))
def test_blocks_no_query_sees_are_no_task(rng, case, return_lse):
    """Only the (query block, key block) pairs where some query may see some key make a kernel call."""
    lq, lk, q_chunk, k_chunk, kwargs = PRUNING_CASES[case]
    q, k, v = make_inputs(rng, lq=lq, lk=lk)
    dq = chunked(q, (1, 2, q_chunk, -1))
    dk, dv = chunked(k, (-1, -1, k_chunk, -1)), chunked(v, (-1, -1, k_chunk, -1))
    got = fdask.attention(dq, dk, dv, return_lse=return_lse, **kwargs)
    seen = seen_blocks(dq.chunks[-2], dk.chunks[-2], lq, lk, **kwargs)
    assert not seen.all(), "a case without an invisible block tests nothing here"
    outer = dq.numblocks[0] * dq.numblocks[1]  # (batch blocks) x (head blocks): one problem each
    assert partial_tasks(*(got if return_lse else (got,))) == outer * int(seen.sum()) < outer * seen.size
    with dask.config.set(scheduler="synchronous"):
        if return_lse:
            out, lse = compare(got, q, k, v, **kwargs)
        else:
            out = got.compute()
            np.testing.assert_allclose(out, fusedattn.attention(q, k, v, **kwargs), **tol(np.float32))
    blind = ~seen.any(axis=1)  # query blocks that see no key block: exactly 0 (and -inf), as the direct call
    if case.startswith("nothing_visible"):
        assert blind.any()
    rows = np.repeat(blind, dq.chunks[-2])
    assert np.all(out[..., rows, :] == 0.0)
    if return_lse:
        assert np.all(np.isneginf(lse[..., rows]))


def test_single_key_block_with_blind_query_blocks(rng):
    """One key block (no merge, no packing) and query blocks that see no key: 0 in the output dtype."""
    q, k, v = (x.astype(np.float16) for x in make_inputs(rng, lq=70, lk=30))
    out = fdask.attention(chunked(q, (1, 2, 16, -1)), k, v, causal="bottom_right")
    # Rows < 40 see nothing: query blocks [0, 16) and [16, 32) make no call; 3 blocks x 2 batch x 2 head blocks do.
    assert partial_tasks(out) == 3 * 2 * 2
    got = out.compute(scheduler="synchronous")
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, fusedattn.attention(q, k, v, causal="bottom_right"))


def test_graphs_of_different_calls_do_not_collide(rng):
    """Task names hash every argument: two calls on the same arrays, computed together, stay distinct."""
    q, k, v = make_inputs(rng)
    dq, dk, dv = chunked(q, (1, 2, 20, -1)), chunked(k, (-1, -1, 30, -1)), chunked(v, (-1, -1, 30, -1))
    kwargs = [dict(), dict(causal=True), dict(causal="bottom_right"), dict(scale=0.5), dict(window=(3, 3))]
    got = dask.compute(*(fdask.attention(dq, dk, dv, **kw) for kw in kwargs), scheduler="synchronous")
    for out, kw in zip(got, kwargs):
        np.testing.assert_allclose(out, fusedattn.attention(q, k, v, **kw), err_msg=str(kw), **tol(np.float32))


def test_nothing_is_computed_before_compute(rng):
    calls = []

    def load(block):
        calls.append(1)
        return block

    q, k, v = make_inputs(rng)
    dk = chunked(k, (-1, -1, 20, -1)).map_blocks(load, meta=np.empty((0,) * 4, np.float32))
    out = fdask.attention(chunked(q, (1, -1, -1, -1)), dk, chunked(v, (-1, -1, 20, -1)), causal=True)
    assert calls == []
    out.compute(scheduler="synchronous")
    # Each key block is loaded once, for both batch blocks; the 4th (keys 60..79, above the causal diagonal of
    # all 48 queries) is no task, so it is never loaded.
    assert len(calls) == 3


# ---------------------------------------------------------------------------------------------
# Other schedulers: the tasks are module-level functions and NumPy blocks, so they pickle
# ---------------------------------------------------------------------------------------------

def test_processes_scheduler(rng):
    """Blocks travel to worker processes pickled: the kernel must accept unpickled arrays."""
    q, k, v = make_inputs(rng)
    mask = make_mask(rng, "bool_heads_broadcast")
    got = fdask.attention(chunked(q, (1, 2, -1, -1)), chunked(k, (-1, -1, 40, -1)), chunked(v, (-1, -1, 40, -1)),
                          mask=mask, causal="bottom_right", return_lse=True)
    with dask.config.set(scheduler="processes", num_workers=2):
        compare(got, q, k, v, mask=mask, causal="bottom_right")


@pytest.fixture(scope="module")
def cluster_client():
    """A dask.distributed LocalCluster on loopback TCP: 2 workers (threads of this process).

    The scheduler's HTTP server always listens (dashboard_address=None means its default port 8787, with a
    UserWarning when that port is taken, e.g. by the next cluster): an ephemeral loopback port avoids both.
    """
    distributed = pytest.importorskip("distributed", reason="needs dask.distributed: pip install 'dask[distributed]'")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, host="127.0.0.1",
                                  protocol="tcp", dashboard_address="127.0.0.1:0") as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        yield client


@pytest.mark.parametrize("chunking", ["mixed", "lk_uneven_many"])
@pytest.mark.parametrize("mask_kind", ["bool_heads_broadcast", "float_2d"])
def test_distributed_local_cluster(rng, cluster_client, chunking, mask_kind):
    q, k, v = make_inputs(rng)
    mask = make_mask(rng, mask_kind)
    qc, kc = CHUNKINGS[chunking]
    out, lse = fdask.attention(chunked(q, qc), chunked(k, kc), chunked(v, kc[:-1] + (-1,)), mask=mask,
                               causal="bottom_right", return_lse=True)
    got = cluster_client.compute([out, lse], sync=True)
    want, want_lse = fusedattn.attention(q, k, v, mask=mask, causal="bottom_right", return_lse=True)
    np.testing.assert_allclose(got[0], want, **tol(np.float32))
    np.testing.assert_allclose(got[1], want_lse, **tol(np.float32))


def test_distributed_worker_processes(rng):
    """Workers in separate processes (spawned, ~5-10 s to start): the blocks are serialised both ways."""
    distributed = pytest.importorskip("distributed", reason="needs dask.distributed: pip install 'dask[distributed]'")
    q, k, v = make_inputs(rng)
    out = fdask.attention(chunked(q, (1, 2, 20, -1)), chunked(k, (-1, -1, 30, -1)), chunked(v, (-1, -1, 30, -1)),
                          causal=True)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address="127.0.0.1:0") as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        got = client.compute(out, sync=True)
    np.testing.assert_allclose(got, fusedattn.attention(q, k, v, causal=True), **tol(np.float32))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_errors(rng):
    q, k, v = make_inputs(rng)
    dq, dk, dv = chunked(q, -1), chunked(k, -1), chunked(v, -1)
    with pytest.raises(ValueError, match=r"q's last axis \(D = 16\) must be a single chunk.*q.rechunk\(\{-1: -1\}\)"):
        fdask.attention(chunked(q, (-1, -1, -1, 8)), dk, dv)
    with pytest.raises(ValueError, match=r"k's last axis \(D = 16\) must be a single chunk"):
        fdask.attention(dq, chunked(k, (-1, -1, -1, 4)), dv)
    with pytest.raises(ValueError, match=r"v's last axis \(Dv = 12\) must be a single chunk.*v.rechunk"):
        fdask.attention(dq, dk, chunked(v, (-1, -1, -1, 6)))
    with pytest.raises(ValueError, match=r"head chunks \(1, 1, 1, 1\) split the groups of 2 query heads.*"
                                         r"q.rechunk\(\{-3: 2\}\)"):
        fdask.attention(chunked(q, (-1, 1, -1, -1)), dk, dv)
    # The direct call's own checks, with its messages:
    with pytest.raises(TypeError, match="share one dtype"):
        fdask.attention(dq, dk.astype(np.float64), dv)
    with pytest.raises(TypeError, match="must have dtype float32, float64"):
        fdask.attention(dq.astype(np.int32), dk, dv)
    with pytest.raises(ValueError, match="same head dim"):
        fdask.attention(dq[..., :8], dk, dv)
    with pytest.raises(ValueError, match="not broadcastable"):
        fdask.attention(dq, dk, dv, mask=np.ones((LQ, LK + 1), bool))
    with pytest.raises(TypeError, match="mask must be a bool array"):
        fdask.attention(dq, dk, dv, mask=da.ones((LQ, LK), dtype=np.int8))
    with pytest.raises(ValueError, match="causal must be one of"):
        fdask.attention(dq, dk, dv, causal="diagonal")
    with pytest.raises(TypeError, match="q must be a dask array or a floating-point array"):
        fdask.attention([[1.0], [1.0, 2.0]], dk, dv)


# ---------------------------------------------------------------------------------------------
# The long-context example, at a small size
# ---------------------------------------------------------------------------------------------

def test_long_context_example_smoke(tmp_path):
    proc = subprocess.run([PYTHON, "-W", "error", str(EXAMPLE), "--size-gb", "0.05", "--tmpdir", str(tmp_path)],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"example failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr == ""
    out = proc.stdout

    def number(label):
        match = re.search(re.escape(label) + r"\s*([-+0-9.e]+)", out)
        assert match, f"{label!r} not in:\n{out}"
        return float(match.group(1))

    assert 0.04 <= number("K+V on disk (GB):") <= 0.07
    # Outputs are ~0.06 at most (weighted means of ~6000 standard-normal values); float32 attention over
    # them is measured at ~5e-8 from the float64 truth and ~2e-8 from the merged direct calls.
    assert number("max |dask - float64 reference|:") < 1e-5
    assert number("max |dask - merged direct calls|:") < 1e-5
    assert number("peak RSS (MB):") > 0 and number("throughput (GB/s):") > 0
    assert list(tmp_path.iterdir()) == [], "the example must delete its temporary folder"
