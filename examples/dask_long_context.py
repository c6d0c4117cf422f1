"""Attention over a key/value cache bigger than you want in RAM: Dask blocks over files on disk.

Builds K and V of shape (1, heads, Lk, head_dim), float32, as raw files in a temporary folder (np.memmap
can open them; ``--size-gb`` of K + V together, 2 GB by default), then attends a few queries at the end of
the sequence (``causal="bottom_right"``) over all of it with ``fusedattn.dask.attention`` on the threaded
scheduler. Each task maps one key block of the files, runs the fused kernel on it and lets it go; the
partial results (a few rows each) are merged by logsumexp in a tree. Memory stays at a few blocks, whatever
the file size.

The result is checked two ways, neither of which is the Dask path:
  * one head end to end in float64 NumPy (scores, softmax, weighted sum), streaming the files;
  * for every head, direct fusedattn calls per key block merged with fusedattn.merge_attention.

Prints the size on disk, the throughput of the Dask pass (GB of K/V read per second; the files are evicted
from the page cache first where the OS allows, so this is a read from disk), the direct pass's (by then
the files are cached) and the peak resident memory (VmHWM).

    python examples/dask_long_context.py                 # 2 GB of K + V
    python examples/dask_long_context.py --size-gb 0.05  # a quick run
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time

import numpy as np

try:
    import dask
    import dask.array as da
except ImportError:
    raise SystemExit('this example needs Dask: pip install "fusedattn[dask]"') from None

import fusedattn
import fusedattn.dask

try:
    from fusedattn import merge_attention
except ImportError:  # a tree where fusedattn/__init__.py does not export it (yet)
    from fusedattn.merge import merge_attention

DTYPE = np.dtype(np.float32)


class MemmapBlocks:
    """An array-like over a raw file whose ``[...]`` maps the file afresh and returns a view of that block.

    Why not ``da.from_array(np.memmap(path))``: every task would slice the *same* mapping, and the pages it
    touched would stay mapped (and counted as resident) until the end; 2 GB of K/V would end up "resident".
    A mapping per block is released with the block, so the resident set is the blocks in flight. The kernel
    reads the mapped pages in place: no copy into anonymous memory.
    """

    def __init__(self, path, shape, dtype):
        self.path, self.shape, self.dtype, self.ndim = path, tuple(shape), np.dtype(dtype), len(shape)

    def __getitem__(self, index):
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.shape)[index]


def rss_mb(field="VmHWM"):
    """A memory field of /proc/self/status in MB (VmHWM: the peak resident set; VmRSS: the current one),
    or NaN where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb():
    return rss_mb("VmHWM")


def reset_peak_rss():
    """Restart VmHWM from the current resident set (Linux >= 4.0; silently nothing elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_random(path, heads, length, dim, rng, rows):
    """(1, heads, length, dim) float32 standard normal, written sequentially a block of rows at a time
    (so building it needs one block of memory, not the file's size)."""
    with open(path, "wb") as f:
        for _ in range(heads):
            for start in range(0, length, rows):
                rng.standard_normal((min(rows, length - start), dim), dtype=DTYPE).tofile(f)
        f.flush()
        os.fsync(f.fileno())
    evict(path)


def evict(path):
    """Drop the file's pages from the page cache (Linux), so the Dask pass reads from the disk."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def float64_head_reference(q_head, k_blocks, v_blocks, head, rows):
    """Attention of one head in float64 NumPy, bottom-right causal, streaming K and V a block of rows at a
    time (each block mapped afresh and released, as in the Dask pass)."""
    _, _, lk, d = k_blocks.shape
    nq = q_head.shape[0]
    q64 = q_head.astype(np.float64) / math.sqrt(d)
    scores = np.concatenate([k_blocks[0, head, a:a + rows].astype(np.float64) @ q64.T for a in range(0, lk, rows)])
    allowed = np.arange(lk)[:, None] <= np.arange(nq)[None, :] + (lk - nq)  # query i is position lk - nq + i
    scores = np.where(allowed, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=0))
    weights /= weights.sum(axis=0)
    return sum(weights[a:a + rows].T @ v_blocks[0, head, a:a + rows].astype(np.float64) for a in range(0, lk, rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="K + V on disk, in GB (1e9 bytes); default 2.0")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=4, help="queries at the end of the sequence (default 4)")
    parser.add_argument("--block-mb", type=float, default=64.0, help="size of one K block in MB (default 64)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="Dask worker threads")
    parser.add_argument("--tmpdir", default=None, help="where to create the temporary folder (default: the system's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    h, d, nq = args.heads, args.head_dim, args.queries
    bytes_per_key = 2 * h * d * DTYPE.itemsize  # one key and one value, all heads
    lk = max(nq, math.ceil(args.size_gb * 1e9 / bytes_per_key))
    # Key blocks of ~block_mb, but at least ~8 of them (so a small run still exercises the merge tree).
    rows = int(args.block_mb * 1e6 / (h * d * DTYPE.itemsize))
    rows = max(256, min(rows, -(-math.ceil(lk / 8) // 256) * 256))
    shape = (1, h, lk, d)
    rng = np.random.default_rng(args.seed)
    q = rng.standard_normal((1, h, nq, d), dtype=DTYPE)

    folder = tempfile.mkdtemp(prefix="fusedattn-dask-", dir=args.tmpdir)
    try:
        k_path, v_path = os.path.join(folder, "k.f32"), os.path.join(folder, "v.f32")
        start = time.perf_counter()
        write_random(k_path, h, lk, d, rng, rows)
        write_random(v_path, h, lk, d, rng, rows)
        kv_bytes = os.path.getsize(k_path) + os.path.getsize(v_path)
        print(f"K, V: {shape} float32 each, in {folder}")
        print(f"K+V on disk (GB): {kv_bytes / 1e9:.3f}   (written in {time.perf_counter() - start:.1f} s)")

        chunks = (1, h, rows, d)
        k_blocks, v_blocks = MemmapBlocks(k_path, shape, DTYPE), MemmapBlocks(v_path, shape, DTYPE)
        k = da.from_array(k_blocks, chunks=chunks, name=f"k-{folder}")
        v = da.from_array(v_blocks, chunks=chunks, name=f"v-{folder}")
        # Many key blocks per core: one kernel thread per task, the Dask threads fill the cores (the kernel
        # releases the GIL). Without num_threads=1 each task would start cores-many OpenMP threads too.
        out, lse = fusedattn.dask.attention(q, k, v, causal="bottom_right", return_lse=True, num_threads=1)
        print(f"{k.numblocks[2]} key blocks of {rows} keys ({rows * h * d * DTYPE.itemsize / 1e6:.0f} MB of K each), "
              f"{len(out.__dask_graph__())} tasks, {args.threads} threads")

        peak_before, rss_before = peak_rss_mb(), rss_mb("VmRSS")
        reset = reset_peak_rss()
        start = time.perf_counter()
        out, lse = dask.compute(out, lse, scheduler="threads", num_workers=args.threads)
        seconds = time.perf_counter() - start
        print(f"dask pass: {seconds:.2f} s" + (f", peak RSS during it {peak_rss_mb():.0f} MB (from {rss_before:.0f} MB "
                                                  f"before it)" if reset else ""))
        print(f"throughput (GB/s): {kv_bytes / 1e9 / seconds:.2f}   (K/V read once, page cache evicted before)")

        # Check 1: the last head end to end in float64, no fusedattn involved.
        ref = float64_head_reference(q[0, h - 1], k_blocks, v_blocks, h - 1, rows)
        print(f"max |dask - float64 reference|: {np.abs(out[0, h - 1] - ref).max():.3g}   "
              f"(head {h - 1}; max |out| {np.abs(ref).max():.3g})")

        # Check 2: every head, direct kernel calls per key block (at their global positions), merged.
        start = time.perf_counter()
        parts = []
        for a in range(0, lk, rows):
            kb, vb = k_blocks[:, :, a:a + rows], v_blocks[:, :, a:a + rows]
            parts.append(fusedattn.attention(q, kb, vb, causal=True, q_start=lk - nq, k_start=a, return_lse=True))
            del kb, vb  # unmap the block
        direct = time.perf_counter() - start
        merged, merged_lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
        print(f"max |dask - merged direct calls|: {np.abs(out - merged).max():.3g}   "
              f"(lse: {np.abs(lse - merged_lse).max():.3g}; direct pass {kv_bytes / 1e9 / direct:.2f} GB/s from the page cache)")
        peak = max(peak_before, peak_rss_mb())  # VmHWM may have been restarted before the dask pass
        print(f"peak RSS (MB): {peak:.0f}   (whole run; K+V: {kv_bytes / 1e6:.0f} MB)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
