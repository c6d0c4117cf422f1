"""Long context: attention over a key/value cache streamed from disk
==================================================================

A long context need not fit in memory at once. Attention over the union of disjoint key blocks is exactly the
log-sum-exp–weighted merge of the attention over each block, so the keys and values can be read one block at
a time — from disk here, from other machines in sequence-parallel inference — and
:func:`fusedattn.merge_attention` combines the partial results. Each block's call passes its global positions
(``q_start``, ``k_start``), so the causal mask stays exact across blocks.

The cache (65,536 tokens, 4 kv heads, 64 dims: 134 MB of K + V in float32) is written to a temporary file and
opened with :class:`numpy.memmap`. A "needle" is planted: the last query of one head is made to match the key at
position 45,000. The figure shows how much of each query's attention mass each block received
(``exp(lse_block − lse_total)``): the needle's block takes almost all of it for that query.
With Dask installed (``pip install "fusedattn[dask]"``), :func:`fusedattn.dask.attention` builds the same
computation as a task graph, one task per block, and the example checks it too.
"""
import os
import tempfile
import time

import matplotlib.pyplot as plt
import numpy as np

import fusedattn

LK, H, D, LQ, BLOCK, NEEDLE = 65_536, 4, 64, 8, 8_192, 45_000
rng = np.random.default_rng(0)
folder = tempfile.mkdtemp()
path = os.path.join(folder, "kv.f32")

# %%
# Write the cache to disk, block by block
# ---------------------------------------
kv = np.memmap(path, np.float32, "w+", shape=(2, 1, H, LK, D))
for a in range(0, LK, BLOCK):
    kv[:, :, :, a:a + BLOCK] = rng.standard_normal((2, 1, H, BLOCK, D), dtype=np.float32)
q = rng.standard_normal((1, H, LQ, D), dtype=np.float32)
q[0, 2, -1] = 4.0 * kv[0, 0, 2, NEEDLE]                         # head 2's last query looks for the needle
kv.flush()
del kv
print(f"K + V on disk: {os.path.getsize(path) / 1e6:.0f} MB, {LK:,} tokens, blocks of {BLOCK:,}")

# %%
# Attend block by block and merge
# -------------------------------
# The queries are the last ``LQ`` positions of the sequence, so ``q_start = LK - LQ``; with ``causal=True`` each
# block sees exactly its part of the causal mask.
kv = np.memmap(path, np.float32, "r", shape=(2, 1, H, LK, D))
start = time.perf_counter()
outs, lses = [], []
for a in range(0, LK, BLOCK):
    k, v = kv[0, :, :, a:a + BLOCK], kv[1, :, :, a:a + BLOCK]   # strided views of the mapped file
    out, lse = fusedattn.attention(q, k, v, causal=True, q_start=LK - LQ, k_start=a, return_lse=True)
    outs.append(out)
    lses.append(lse)
out, lse = fusedattn.merge_attention(outs, lses)
print(f"{len(outs)} blocks merged in {time.perf_counter() - start:.2f} s")

whole = fusedattn.attention(q, kv[0], kv[1], causal="bottom_right")   # one call over everything, to compare
print(f"max |merged - one call| = {np.abs(out - whole).max():.1e}")

share = np.exp(np.stack(lses) - lse)                             # (blocks, 1, H, LQ): attention mass per block
print(f"head 2, last query: {share[NEEDLE // BLOCK, 0, 2, -1]:.1%} of its attention in the needle's block "
      f"(block {NEEDLE // BLOCK}); an unremarkable query spreads it: "
      f"{share[NEEDLE // BLOCK, 0, 0, -1]:.1%}")

# %%
# The same with Dask
# ------------------
try:
    import dask.array as da

    import fusedattn.dask
except ImportError as exc:
    print(f"Dask part skipped: {exc} (pip install 'fusedattn[dask]')")
else:
    kd = da.from_array(kv[0], chunks=(1, H, BLOCK, D))
    vd = da.from_array(kv[1], chunks=(1, H, BLOCK, D))
    lazy = fusedattn.dask.attention(q, kd, vd, causal="bottom_right")
    print(f"Dask: {len(lazy.dask)} tasks; max |dask - one call| = {np.abs(lazy.compute() - whole).max():.1e}")

# %%
# Where each query's attention went
# ---------------------------------
fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
blocks = np.arange(len(outs))
width = 0.8 / 3
for j, (h, i, label) in enumerate([(0, LQ - 1, "head 0, last query"), (2, LQ - 2, "head 2, next-to-last query"),
                                    (2, LQ - 1, "head 2, last query (looks for the needle)")]):
    ax.bar(blocks - 0.4 + width * (j + 0.5), share[:, 0, h, i], width=width * 0.95, label=label)
ax.set_xticks(blocks, [f"{a // 1024}k–{(a + BLOCK) // 1024}k" for a in range(0, LK, BLOCK)], fontsize=8)
ax.set_xlabel("key block (token positions)")
ax.set_ylabel("share of the query's attention\nexp(lse_block − lse_total)")
ax.set_title(f"{LK:,}-token context read from disk in {len(outs)} blocks, merged with merge_attention")
ax.legend(fontsize=8)
ax.grid(axis="y", alpha=0.3)
plt.show()

del kv
os.remove(path)
os.rmdir(folder)
