"""Translation: the cross-attention alignment between two sentences
================================================================

Encoder-decoder cross-attention with KV caches: the alignment between a source and a target sentence.

A toy "translation" model, built by hand so that its attention is readable (nothing is trained):

* Words of both languages are embedded from shared *concept* vectors ("chat" and "cat" share one),
  plus a little noise. The encoder is one self-attention layer (MultiHeadAttention, random weights,
  residual): its output, the *memory*, still carries each source word's concept.
* The decoder runs token by token, as generation does. Each step it (1) appends the new token's
  keys/values to a growing self-attention KVCache and attends to everything generated so far, then
  (2) cross-attends to the encoder memory, whose keys/values were projected once into a second
  KVCache before decoding started (attend with causal=False: every source word is visible).
  The decoder's "state" for a target word is that word's own embedding (an oracle standing in for
  a trained decoder), so the cross-attention query of "chat" looks for the concept "cat".
* The cross-attention's weights are set with load_state_dict so that queries and keys are the same
  projection of the concept space: a target word attends to the source word(s) sharing its concept.

The printed alignment matrix (rows: target words, columns: source words, head-averaged weights)
shows the reordering "black cat" -> "chat noir" and the one-to-many "sat" -> "était assis". The
script then checks that the step-by-step cached decoding equals one full-sequence call of the same
layers (causal self-attention; cross-attention with need_weights=True), and saves the matrix as a
PNG when matplotlib is available.

Usage:  python examples/translation_attention.py [OUTPUT.png]   (default: alignment.png in the cwd)
"""
from __future__ import annotations

import argparse

import numpy as np

import fusedattn
from fusedattn.kv_cache import KVCache
from fusedattn.layers import MultiHeadAttention

SOURCE = ["the", "black", "cat", "sat", "on", "the", "mat"]
TARGET = ["le", "chat", "noir", "était", "assis", "sur", "le", "tapis"]
CONCEPT_OF = {"le": "the", "chat": "cat", "noir": "black", "était": "sat", "assis": "sat", "sur": "on", "tapis": "mat"}
EMBED, HEADS = 32, 4
HEAD_DIM = EMBED // HEADS
SHARPNESS = 1.5  # scales queries and keys of the cross-attention: higher = crisper alignment


def split_heads(x, heads):
    """(L, heads * HEAD_DIM) -> (1, heads, L, HEAD_DIM), a view."""
    return x.reshape(1, x.shape[0], heads, HEAD_DIM).transpose(0, 2, 1, 3)


def project(layer, x, which):
    """x @ W^T + b for the q, k or v rows of a MultiHeadAttention's stacked in-projection."""
    rows = {"q": slice(0, EMBED), "k": slice(EMBED, 2 * EMBED), "v": slice(2 * EMBED, 3 * EMBED)}[which]
    return x @ layer.in_proj_weight[rows].T + layer.in_proj_bias[rows]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Encoder-decoder cross-attention with KV caches: the alignment between two sentences.")
    parser.add_argument("output", nargs="?", default="alignment.png", help="alignment PNG (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)

    concepts = {c: rng.standard_normal(EMBED).astype(np.float32) for c in dict.fromkeys(SOURCE)}
    src = np.stack([concepts[w] for w in SOURCE]) + 0.1 * rng.standard_normal((len(SOURCE), EMBED)).astype(np.float32)
    tgt = np.stack([concepts[CONCEPT_OF[w]] for w in TARGET])
    tgt = tgt + 0.1 * rng.standard_normal(tgt.shape).astype(np.float32)

    # Encoder: one self-attention layer with a residual connection.
    encoder = MultiHeadAttention(EMBED, HEADS, rng=rng)
    memory = src + encoder(src)[0]                                          # (Ls, E)

    decoder_self = MultiHeadAttention(EMBED, HEADS, rng=rng)
    cross = MultiHeadAttention(EMBED, HEADS, rng=rng)
    eye = np.eye(EMBED, dtype=np.float32)
    cross.load_state_dict({"in_proj_weight": np.concatenate([SHARPNESS * eye, SHARPNESS * eye, eye]),
                           "in_proj_bias": np.zeros(3 * EMBED, np.float32),
                           "out_proj.weight": eye, "out_proj.bias": np.zeros(EMBED, np.float32)})

    # The cross-attention keys/values depend on the source only: project them once, before decoding.
    cross_cache = KVCache(1, HEADS, max_len=len(SOURCE), head_dim=HEAD_DIM)
    cross_cache.append(split_heads(project(cross, memory, "k"), HEADS), split_heads(project(cross, memory, "v"), HEADS))
    self_cache = KVCache(1, HEADS, max_len=len(TARGET), head_dim=HEAD_DIM)

    alignment = np.zeros((len(TARGET), len(SOURCE)), np.float32)
    states, outputs = [], []
    for t in range(len(TARGET)):
        x_t = tgt[t:t + 1]                                                  # (1, E): the new token
        # (1) self-attention over the target so far: only the new token's k/v are computed and stored.
        self_cache.append(split_heads(project(decoder_self, x_t, "k"), HEADS),
                          split_heads(project(decoder_self, x_t, "v"), HEADS))
        ctx = self_cache.attend(split_heads(project(decoder_self, x_t, "q"), HEADS))   # (1, H, 1, hd)
        h_t = x_t + ctx.transpose(0, 2, 1, 3).reshape(1, EMBED) @ decoder_self.out_proj_weight.T + decoder_self.out_proj_bias
        # (2) cross-attention to the cached encoder memory: every source word is visible.
        q_t = split_heads(project(cross, h_t, "q"), HEADS)
        out_t = cross_cache.attend(q_t, causal=False)
        alignment[t] = fusedattn.attention_weights(q_t, cross_cache.keys).mean(axis=1)[0, 0]
        states.append(h_t)
        outputs.append(out_t.transpose(0, 2, 1, 3).reshape(1, EMBED) @ cross.out_proj_weight.T + cross.out_proj_bias)

    width = max(len(w) for w in SOURCE + TARGET) + 1
    print(f"backend: {fusedattn.backend_info()['isa']}")
    print("cross-attention alignment (rows: target words, columns: source words; head-averaged weights)\n")
    print(" " * width + "".join(f"{w:>{width}}" for w in SOURCE))
    for t, word in enumerate(TARGET):
        print(f"{word:<{width}}" + "".join(f"{a:>{width}.2f}" for a in alignment[t]))
    print("\nmost attended source word:")
    for t, word in enumerate(TARGET):
        print(f"  {word:<{width}} -> {SOURCE[int(np.argmax(alignment[t]))]}")

    # The same layers in one call each over the whole target reproduce the cached decoding.
    full_states = tgt + decoder_self(tgt, causal=True)[0]
    full_out, full_weights = cross(full_states, memory, need_weights=True)
    print("\ncached step-by-step decoding vs one full-sequence call (max |difference|):")
    print(f"  decoder states {float(np.abs(np.concatenate(states) - full_states).max()):.2e}, "
          f"cross-attention output {float(np.abs(np.concatenate(outputs) - full_out).max()):.2e}, "
          f"alignment {float(np.abs(alignment - full_weights).max()):.2e}")

    try:
        from fusedattn.plot import attention_map

        ax = attention_map(alignment, query_labels=TARGET, key_labels=SOURCE)
    except ImportError as exc:
        print(f"\nPNG skipped: {exc}")
        return 0
    ax.set_xlabel("source (English)")
    ax.set_ylabel("target (French)")
    ax.set_title("cross-attention alignment")
    ax.figure.savefig(args.output, dpi=110)
    print(f"\nsaved alignment PNG: {args.output}")
    return 0


if __name__ == "__main__":
    main()
