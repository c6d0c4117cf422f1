"""Benchmark: fusedattn beside onnxruntime, torch and naive NumPy
==============================================================

``fusedattn bench`` checks every library's answer against naive NumPy, then times each on the same
inputs and thread count. Its peers are onnxruntime's ``MultiHeadAttention`` operator (installed by the
``[bench]`` extra, so it is compared on every machine) and torch's ``scaled_dot_product_attention`` when
torch is installed; naive NumPy, which materialises the scores, is the baseline.

This example runs the command on three small shapes (a prefill, a causal prefill and a one-token decode
step), on the machine that built this page, and draws the JSON it writes. Small shapes on a shared build
machine are noisy — rows whose repetitions disagree are flagged ``NOISY`` — so the reference numbers are
the tables of the :doc:`performance page <../performance>`. To reproduce those::

    pip install ".[bench]" && fusedattn bench --threads 2 --json bench.json --plot bench.png
"""
import json
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np

from fusedattn import cli

SHAPES = "1x8x256x256x64,1x8x512x512x64c,1x16x1x16384x64"  # the decode step reads 128 MiB of K + V
threads = str(min(2, os.cpu_count() or 1))
path = os.path.join(tempfile.mkdtemp(), "bench.json")
code = cli.main(["bench", "--shapes", SHAPES, "--threads", threads, "--json", path])
with open(path, encoding="utf-8") as handle:
    document = json.load(handle)
os.remove(path)
os.rmdir(os.path.dirname(path))
print(f"exit code {code}")

# %%
# The rows as a plot
# ------------------
# Bars: each library's time relative to fusedattn's on the same row (above 1: slower than fusedattn).
libraries = [lib for lib in ("onnxruntime", "torch", "naive") if any(lib in row["results"] for row in document["rows"])]
colours = {"onnxruntime": "#3a923a", "torch": "#e07b24", "naive": "#8c8c8c"}
fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
rows = document["rows"]
width = 0.8 / len(libraries)
for j, lib in enumerate(libraries):
    ratios = [row.get(f"speedup_vs_{lib}") for row in rows]
    xs = [i - 0.4 + width * (j + 0.5) for i in range(len(rows))]
    ax.bar([x for x, r in zip(xs, ratios) if r], [r for r in ratios if r], width=0.95 * width, color=colours[lib],
           label=f"{lib} time / fusedattn time")
ax.axhline(1.0, color="#1f4e9c", linewidth=1.5, label="fusedattn (= 1)")
ax.set_yscale("log")
labels = []
for row in rows:
    kind = "decode" if row["bound"] == "memory" else ("causal prefill" if row["causal"] else "prefill")
    fused = row["results"]["fusedattn"]
    labels.append(f"{row['shape']}\n{kind}, fusedattn {fused['ms']:.2f} ms" + ("\n(NOISY)" if row["noisy"] else ""))
ax.set_xticks(range(len(rows)), labels, fontsize=8)
ax.set_ylabel("time relative to fusedattn (log scale)")
ax.set_title(f"fusedattn bench on the machine that built these pages ({document['threads']} threads, float32)")
ax.legend(fontsize=8)
ax.grid(axis="y", alpha=0.3, which="both")
plt.show()
