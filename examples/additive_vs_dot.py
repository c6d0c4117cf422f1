"""Dot-product vs additive attention on the same inputs: their weights, and fused vs NumPy speed.

    dot:       score[i, j] = q_i . k_j / sqrt(D)                      fusedattn.attention
    additive:  score[i, j] = sum_d w_d tanh(q_i[d] + k_j[d])          fusedattn.additive_attention

(the additive score is Keras' AdditiveAttention, i.e. Bahdanau's v_a . tanh(W_q q + W_k k) with the
projections already applied.) Both are softmaxed over j and applied to the same values.

The script prints, for one query, the keys each score prefers, how peaked the two weight
distributions are, and each result's error against the float64 reference; then it times the fused
kernel against a NumPy implementation of the same formula (materialised scores; for the additive
score the (Lq, Lk, D) tanh tensor, in query chunks), best of N runs each in this one process.

Usage:  python examples/additive_vs_dot.py [--seq 256] [--dim 32] [--heads 4] [--repeats 5] [--threads N]

Timings are of this machine at this moment: on a loaded machine an OpenMP thread that the OS has
descheduled holds up the whole call, so small shapes are best compared with --threads 1.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import numpy as np

import fusedattn
from fusedattn import reference


def numpy_dot(q, k, v):
    """softmax(q k^T / sqrt(D)) v with materialised scores, in the inputs' dtype."""
    s = (q @ np.swapaxes(k, -1, -2)) * q.dtype.type(1.0 / np.sqrt(q.shape[-1]))
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v


def numpy_additive(q, k, v, w, chunk=32):
    """softmax_j(sum_d w_d tanh(q_i[d] + k_j[d])) v: the (chunk, Lk, D) tanh tensor at a time."""
    out = np.empty(q.shape[:-1] + (v.shape[-1],), q.dtype)
    for start in range(0, q.shape[-2], chunk):
        qc = q[..., start:start + chunk, :]
        s = np.tanh(qc[..., :, None, :] + k[..., None, :, :]) @ w
        e = np.exp(s - s.max(-1, keepdims=True))
        out[..., start:start + chunk, :] = (e / e.sum(-1, keepdims=True)) @ v
    return out


def best_ms(fn, repeats):
    fn()  # warm-up: first-touch page faults and thread start-up are not the kernel's speed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def entropy(p):
    return float(-(p * np.log(np.where(p > 0, p, 1.0))).sum(-1).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="Lq = Lk")
    parser.add_argument("--dim", type=int, default=32, help="head dim D (= Dv)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per implementation; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="fusedattn's OpenMP threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    blas_limit = contextlib.nullcontext()
    if args.threads is not None:
        fusedattn.set_num_threads(args.threads)
        try:  # give NumPy's BLAS the same number of threads (threadpoolctl comes with the [bench] extra)
            from threadpoolctl import threadpool_limits

            blas_limit = threadpool_limits(limits=args.threads)
        except ImportError:
            print("note: threadpoolctl is not installed, NumPy's BLAS uses its default threads")

    rng = np.random.default_rng(args.seed)
    shape = (args.batch, args.heads, args.seq, args.dim)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    # The additive score's v_a, scaled so that its scores spread about as widely as the dot scores
    # (std ~1: a sum of D terms w_d tanh(.), and E[tanh^2] ~ 0.5 for these standard-normal inputs).
    w = (rng.standard_normal(args.dim) / np.sqrt(0.5 * args.dim)).astype(np.float32)

    dot_w = fusedattn.attention_weights(q, k)
    add_w = fusedattn.attention_weights(q, k, kind="additive", score_weight=w)
    print(f"backend: {fusedattn.backend_info()['isa']}, threads: {fusedattn.get_num_threads()}")
    print(f"inputs: q, k, v {shape} float32\n")
    print("query 0 of head 0, its five highest-weighted keys:")
    for name, weights in (("dot", dot_w), ("additive", add_w)):
        top = np.argsort(weights[0, 0, 0])[::-1][:5]
        print(f"  {name:<9}" + "  ".join(f"k{j}:{weights[0, 0, 0, j]:.3f}" for j in top))
    uniform = float(np.log(args.seq))
    print(f"\nmean entropy of a row (uniform = {uniform:.2f}): dot {entropy(dot_w):.2f}, additive {entropy(add_w):.2f}")
    corr = float(np.corrcoef(dot_w.ravel(), add_w.ravel())[0, 1])
    corr = 0.0 if abs(corr) < 0.005 else corr  # print 0.00, not -0.00
    print(f"correlation between the two weight matrices: {corr:.2f} (different scores, different focus)")

    out_dot = fusedattn.attention(q, k, v)
    out_add = fusedattn.additive_attention(q, k, v, score_weight=w)
    err_dot = float(np.abs(out_dot - reference.attention(q, k, v)).max())
    err_add = float(np.abs(out_add - reference.additive_attention(q, k, v, score_weight=w)).max())
    err_np = float(np.abs(numpy_additive(q, k, v, w) - out_add).max())
    print(f"max |fused - float64 reference|: dot {err_dot:.1e}, additive {err_add:.1e}; "
          f"|NumPy additive - fused| {err_np:.1e}")

    print(f"\nspeed, best of {args.repeats} (same process, same inputs, fusedattn threads: {fusedattn.get_num_threads()}):")
    print(f"  {'score':<9}{'fused ms':>10}{'NumPy ms':>10}{'NumPy / fused':>15}")
    with blas_limit:
        for name, fused, naive in (("dot", lambda: fusedattn.attention(q, k, v), lambda: numpy_dot(q, k, v)),
                                   ("additive", lambda: fusedattn.additive_attention(q, k, v, score_weight=w),
                                    lambda: numpy_additive(q, k, v, w))):
            t_fused, t_naive = best_ms(fused, args.repeats), best_ms(naive, args.repeats)
            print(f"  {name:<9}{t_fused:>10.3f}{t_naive:>10.3f}{t_naive / t_fused:>14.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
