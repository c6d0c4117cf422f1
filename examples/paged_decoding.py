"""
Serving-style decoding with a paged int8 KV cache
=================================================

A ragged batch of 8 sequences (prompts of different lengths) is decoded token by token through one
:class:`fusedattn.PagedKVCache` holding int8 keys and values (one float32 scale per token and kv head):
every step appends each sequence's new key/value and runs one :func:`fusedattn.attention_paged` call for
the whole batch. Sequences stop at different lengths and are freed (their blocks return to the pool);
one prompt is sampled twice through :meth:`~fusedattn.PagedKVCache.fork`, which shares its prompt's blocks.

The "model" is one attention layer with random projections (grouped-query: 8 query heads over 2 kv
heads) and a random unembedding, so the tokens are meaningless, but the cache traffic is a real decoder's.
At the end, the last step's attention is recomputed from float32 keys/values to show the int8 error.

Run: ``python examples/paged_decoding.py [--steps N] [--seed S]``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import fusedattn as fa

VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 256, 128, 8, 2, 64, 16


def make_model(rng):
    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    return {"embed": rng.standard_normal((VOCAB, EMBED)).astype(np.float32),
            # q, k and v projections side by side: one matmul per step for all three.
            "wqkv": w(EMBED, (HEADS + 2 * KV_HEADS) * HEAD_DIM),
            "wo": w(HEADS * HEAD_DIM, EMBED), "unembed": w(EMBED, VOCAB)}


def project(model, tokens):
    """Queries ``(n, HEADS, HEAD_DIM)`` and keys/values ``(KV_HEADS, n, HEAD_DIM)`` of ``n`` tokens."""
    qkv = (model["embed"][tokens] @ model["wqkv"]).reshape(-1, HEADS + 2 * KV_HEADS, HEAD_DIM)
    q = qkv[:, :HEADS]
    k = qkv[:, HEADS:HEADS + KV_HEADS].transpose(1, 0, 2)
    v = qkv[:, HEADS + KV_HEADS:].transpose(1, 0, 2)
    return q, k, v


def next_tokens(model, tokens, attended):
    """Greedy next token from each sequence's attention output ``(B, HEADS, 1, HEAD_DIM)``."""
    h = model["embed"][tokens] + attended.reshape(len(tokens), -1) @ model["wo"]
    return np.argmax(h @ model["unembed"], axis=-1)


def main():
    parser = argparse.ArgumentParser(description="Serving-style decoding with a paged int8 KV cache.")
    parser.add_argument("--steps", type=int, default=300, help="decoding steps of the longest sequence")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    model = make_model(rng)

    cache = fa.PagedKVCache(KV_HEADS, HEAD_DIM, block_size=BLOCK, dtype=np.int8)
    prompt_lens = [5, 17, 64, 100, 33, 1, 250, 48]
    prompts = [rng.integers(0, VOCAB, n) for n in prompt_lens]
    ids = [cache.add_sequence() for _ in prompts]
    history = {}  # float32 keys/values of every sequence, only for the accuracy check at the end

    # Prefill: every prompt's keys/values in one ragged append (quantised on the way in).
    projected = [project(model, p) for p in prompts]
    cache.append(ids, [k for _, k, _ in projected], [v for _, _, v in projected])
    for s, (_, k, v) in zip(ids, projected):
        history[s] = ([k], [v])
    # Parallel sampling: a second continuation of prompt 3 shares its blocks (copy-on-write).
    twin = cache.fork(ids[3])
    history[twin] = (list(history[ids[3]][0]), list(history[ids[3]][1]))
    ids.append(twin)
    last_q = np.stack([q[-1] for q, _, _ in projected] + [projected[3][0][-1]])[:, :, None, :]
    tokens = next_tokens(model, np.array([p[-1] for p in prompts] + [prompts[3][-1]]),
                         cache.attend(last_q, ids))
    tokens[-1] = (tokens[-1] + 1) % VOCAB  # the twin samples a different first token

    budget = {s: int(args.steps * f) for s, f in zip(ids, np.linspace(0.4, 1.0, len(ids)))}
    generated = {s: 0 for s in ids}
    peak_blocks, decoded, q, in_cache = 0, 0, None, 0.0
    start = time.perf_counter()
    live = list(ids)
    while live:
        q, k, v = project(model, tokens)
        q = np.ascontiguousarray(q[:, :, None, :])  # (B, HEADS, 1, HEAD_DIM): one query per sequence
        for i, s in enumerate(live):
            history[s][0].append(k[:, i:i + 1])
            history[s][1].append(v[:, i:i + 1])
        t0 = time.perf_counter()
        cache.append(live, [k[:, i:i + 1] for i in range(len(live))], [v[:, i:i + 1] for i in range(len(live))])
        attended = cache.attend(q, live)
        in_cache += time.perf_counter() - t0
        tokens = next_tokens(model, tokens, attended)
        decoded += len(live)
        peak_blocks = max(peak_blocks, cache.num_blocks_used)
        for s in live:
            generated[s] += 1
        done = [i for i, s in enumerate(live) if generated[s] >= budget[s]]
        last = (list(live), q, attended)
        for i in reversed(done):
            if len(live) > 1:  # the last one stays, for the accuracy check below
                cache.free(live[i])
                del live[i]
                tokens = np.delete(tokens, i)
        if len(live) == 1 and generated[live[0]] >= budget[live[0]]:
            break
    elapsed = time.perf_counter() - start

    print(f"decoded {decoded} tokens for {len(ids)} sequences (prompts of {min(prompt_lens)}..{max(prompt_lens)} "
          f"tokens, one forked) in {elapsed:.2f} s: {decoded / elapsed:.0f} tokens/s "
          f"({decoded / in_cache:.0f} tokens/s in the cache's append + attend alone)")
    print(f"block size {BLOCK}, {KV_HEADS} kv heads x {HEAD_DIM}, {HEADS} query heads; peak {peak_blocks} blocks in use")
    f32_block = BLOCK * KV_HEADS * 2 * HEAD_DIM * 4
    print(f"peak KV memory: int8 {peak_blocks * cache.block_bytes / 2**20:.2f} MiB (scales included) vs float32 "
          f"{peak_blocks * f32_block / 2**20:.2f} MiB: {f32_block / cache.block_bytes:.2f}x smaller")

    # The last step again, from the float32 keys/values of the sequences it attended.
    seqs, q, attended = last
    ref = fa.PagedKVCache(KV_HEADS, HEAD_DIM, block_size=BLOCK)
    ref_ids = [ref.add_sequence() for _ in seqs]
    ref.append(ref_ids, [np.concatenate(history[s][0], axis=1) for s in seqs],
               [np.concatenate(history[s][1], axis=1) for s in seqs])
    exact = ref.attend(q, ref_ids)
    err = np.abs(attended - exact).max()
    print(f"last step ({len(seqs)} sequences, up to {max(ref.seq_len(s) for s in ref_ids)} tokens): "
          f"max |int8 - float32| attention output = {err:.2e} (max |output| {np.abs(exact).max():.2f})")


if __name__ == "__main__":
    main()
