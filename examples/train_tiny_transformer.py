"""Train a tiny transformer classifier in pure NumPy, with fusedattn.MultiHeadAttention's fused backward pass.

The task (generated here): each sequence is ``[CLS]`` followed by SEQ_LEN tokens from a vocabulary of
VOCAB symbols; the label is the token that appears most often (sequences with a tie are redrawn),
so chance is 1 / VOCAB. The class is read from the ``[CLS]`` position's final state only, and the
blocks are position-wise except attention: everything the classifier knows about the other tokens
must be carried to ``[CLS]`` by attention (here, by attending to the tokens evenly enough that their
average embedding reveals the counts).

Model, for each block (pre-LayerNorm, as GPT-2):

    x = token_embedding[ids] + position_embedding
    x = x + MultiHeadAttention(LayerNorm(x))          # fusedattn: forward and fused backward
    x = x + W2 relu(W1 LayerNorm(x) + b1) + b2
    logits = LayerNorm(x[:, 0]) @ W_out + b_out       # the [CLS] position; softmax cross-entropy

The attention's gradients come from ``MultiHeadAttention.backward`` (the fused FlashAttention-2
style kernel: no ``L x L`` probabilities are kept between forward and backward); everything else,
LayerNorm, the feed-forward layer, the embeddings and Adam, is written out below in NumPy. It is
example code, not library code: compact rather than general.

Usage:  python examples/train_tiny_transformer.py [--steps N] [--quick] [--layers 1|2] [--seed S]
Prints the training loss and accuracy every few steps, then ``test accuracy: ...``. Deterministic
for a given seed (the fused kernels give the same bits at any thread count).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Every matrix here is tiny (at most 32 x 1600): BLAS threads cost more in hand-offs than they save, and
# on a small or busy machine they stall waiting for each other (measured on 2 shared cores: 300 steps
# took 5-29 s with OpenBLAS's default threads, 1.4 s with one). Set before NumPy loads its BLAS; an
# explicit setting in the environment still wins. fusedattn's own OpenMP threads are left as they are.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

import fusedattn  # noqa: E402
from fusedattn.layers import MultiHeadAttention  # noqa: E402

VOCAB = 16               # token symbols 0 .. VOCAB - 1; the [CLS] token is id VOCAB
SEQ_LEN = 24             # tokens after [CLS]
D_MODEL, HEADS, D_FF = 32, 4, 64
DTYPE = np.float32


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def make_batch(rng, n):
    """``n`` sequences ``(n, 1 + SEQ_LEN)`` (``[CLS]`` first) and their labels, the most frequent token."""
    ids = np.empty((0, SEQ_LEN), np.int64)
    while len(ids) < n:
        cand = rng.integers(0, VOCAB, size=(2 * n, SEQ_LEN))
        counts = np.stack([(cand == t).sum(1) for t in range(VOCAB)], axis=1)
        unique_mode = (counts == counts.max(1, keepdims=True)).sum(1) == 1  # ties have no answer: redraw
        ids = np.concatenate([ids, cand[unique_mode]])
    ids = ids[:n]
    labels = np.stack([(ids == t).sum(1) for t in range(VOCAB)], axis=1).argmax(1)
    return np.concatenate([np.full((n, 1), VOCAB), ids], axis=1), labels


# ---------------------------------------------------------------------------------------------
# Layers with hand-written backward passes (each forward returns what its backward needs)
# ---------------------------------------------------------------------------------------------

def layer_norm(x, gain, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    return xhat * gain + bias, (xhat, rstd, gain)


def layer_norm_backward(dy, cache):
    xhat, rstd, gain = cache
    rows = tuple(range(dy.ndim - 1))
    dxhat = dy * gain
    # d/dx of (x - mean) * rstd: remove the gradient's mean and its component along xhat.
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return dx, (dy * xhat).sum(rows), dy.sum(rows)


class Block:
    """One pre-LN transformer block; its NumPy parameters in ``params``, the attention's in ``attn``."""

    def __init__(self, rng):
        self.attn = MultiHeadAttention(D_MODEL, HEADS, dtype=DTYPE, rng=rng)
        init = lambda fan_in, shape: (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(DTYPE)  # noqa: E731
        self.params = {"ln1.g": np.ones(D_MODEL, DTYPE), "ln1.b": np.zeros(D_MODEL, DTYPE),
                       "ln2.g": np.ones(D_MODEL, DTYPE), "ln2.b": np.zeros(D_MODEL, DTYPE),
                       "ff.W1": init(D_MODEL, (D_MODEL, D_FF)), "ff.b1": np.zeros(D_FF, DTYPE),
                       "ff.W2": init(D_FF, (D_FF, D_MODEL)), "ff.b2": np.zeros(D_MODEL, DTYPE)}

    def forward(self, x):
        p = self.params
        a, self.ln1 = layer_norm(x, p["ln1.g"], p["ln1.b"])
        x = x + self.attn(a)[0]             # the layer keeps what its backward needs
        f, self.ln2 = layer_norm(x, p["ln2.g"], p["ln2.b"])
        self.f, self.h = f, np.maximum(f @ p["ff.W1"] + p["ff.b1"], 0)
        return x + self.h @ p["ff.W2"] + p["ff.b2"]

    def backward(self, dy, grads, prefix):
        p = self.params
        grads[prefix + "ff.W2"] = self.h.reshape(-1, D_FF).T @ dy.reshape(-1, D_MODEL)
        grads[prefix + "ff.b2"] = dy.sum((0, 1))
        dh = (dy @ p["ff.W2"].T) * (self.h > 0)
        grads[prefix + "ff.W1"] = self.f.reshape(-1, D_MODEL).T @ dh.reshape(-1, D_FF)
        grads[prefix + "ff.b1"] = dh.sum((0, 1))
        df, grads[prefix + "ln2.g"], grads[prefix + "ln2.b"] = layer_norm_backward(dh @ p["ff.W1"].T, self.ln2)
        dx = dy + df                         # the residual passes dy straight through
        da = self.attn.backward(dx)          # self-attention: one gradient, the sum of the q/k/v paths
        grads.update({prefix + "attn." + name: g for name, g in self.attn.grads.items()})
        dln1, grads[prefix + "ln1.g"], grads[prefix + "ln1.b"] = layer_norm_backward(da, self.ln1)
        return dx + dln1


class Model:
    def __init__(self, rng, layers):
        self.params = {"tok": (rng.standard_normal((VOCAB + 1, D_MODEL)) * 0.5).astype(DTYPE),
                       "pos": (rng.standard_normal((1 + SEQ_LEN, D_MODEL)) * 0.5).astype(DTYPE),
                       "ln.g": np.ones(D_MODEL, DTYPE), "ln.b": np.zeros(D_MODEL, DTYPE),
                       "out.W": np.zeros((D_MODEL, VOCAB), DTYPE), "out.b": np.zeros(VOCAB, DTYPE)}
        self.blocks = [Block(rng) for _ in range(layers)]

    def forward(self, ids):
        p = self.params
        x = p["tok"][ids] + p["pos"]
        for block in self.blocks:
            x = block.forward(x)
        self.ids, self.seq_shape = ids, x.shape
        self.cls, self.ln = layer_norm(x[:, 0], p["ln.g"], p["ln.b"])
        return self.cls @ p["out.W"] + p["out.b"]

    def backward(self, dlogits):
        p, grads = self.params, {}
        grads["out.W"], grads["out.b"] = self.cls.T @ dlogits, dlogits.sum(0)
        dcls, grads["ln.g"], grads["ln.b"] = layer_norm_backward(dlogits @ p["out.W"].T, self.ln)
        dx = np.zeros(self.seq_shape, DTYPE)
        dx[:, 0] = dcls                      # only [CLS] is read by the classifier
        for i, block in reversed(list(enumerate(self.blocks))):
            dx = block.backward(dx, grads, f"block{i}.")
        grads["pos"] = dx.sum(0)
        grads["tok"] = np.zeros_like(p["tok"])
        np.add.at(grads["tok"], self.ids, dx)  # rows of repeated tokens accumulate
        return grads

    # One flat {name: array} view of every parameter, for the optimiser.
    def state(self):
        state = dict(self.params)
        for i, block in enumerate(self.blocks):
            state.update({f"block{i}.{k}": v for k, v in block.params.items()})
            state.update({f"block{i}.attn.{k}": v for k, v in block.attn.state_dict().items()})
        return state

    def load(self, state):
        for name in self.params:
            self.params[name] = state[name]
        for i, block in enumerate(self.blocks):
            for name in block.params:
                block.params[name] = state[f"block{i}.{name}"]
            prefix = f"block{i}.attn."
            block.attn.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy, its gradient with respect to the logits, and the accuracy."""
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    n = len(labels)
    probs = np.exp(logp)
    probs[np.arange(n), labels] -= 1.0
    return float(-logp[np.arange(n), labels].mean()), probs / n, float((logits.argmax(1) == labels).mean())


class Adam:
    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.betas, self.eps, self.t, self.m, self.v = lr, betas, eps, 0, {}, {}

    def step(self, state, grads):
        self.t += 1
        b1, b2 = self.betas
        new = {}
        for name, param in state.items():
            g = grads[name]
            self.m[name] = b1 * self.m.get(name, 0) + (1 - b1) * g
            self.v[name] = b2 * self.v.get(name, 0) + (1 - b2) * g * g
            m_hat, v_hat = self.m[name] / (1 - b1 ** self.t), self.v[name] / (1 - b2 ** self.t)
            new[name] = (param - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)).astype(DTYPE)
        return new


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a short run (300 steps), for smoke tests")
    parser.add_argument("--layers", type=int, choices=(1, 2), default=1, help="transformer blocks (default: 1)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = 300 if args.quick else args.steps
    if steps < 1:
        parser.error(f"--steps must be >= 1, got {steps}")
    log_every = max(1, steps // 10)

    rng = np.random.default_rng(args.seed)
    model = Model(rng, args.layers)
    optimiser = Adam(args.lr)
    test_ids, test_labels = make_batch(rng, 2000)
    print(f"backend: {fusedattn.backend_info()['isa']}; task: most frequent of {SEQ_LEN} tokens over a vocabulary "
          f"of {VOCAB}; chance accuracy: {1 / VOCAB:.3f}")

    start = time.perf_counter()
    window = []
    for step in range(1, steps + 1):
        ids, labels = make_batch(rng, args.batch)
        loss, dlogits, acc = cross_entropy(model.forward(ids), labels)
        model.load(optimiser.step(model.state(), model.backward(dlogits)))
        window.append((loss, acc))
        if step % log_every == 0 or step == steps:
            mean_loss, mean_acc = np.mean(window, axis=0)  # averaged since the last line: less noisy
            print(f"step {step:5d}  loss {mean_loss:.4f}  accuracy {mean_acc:.3f}")
            window = []
    elapsed = time.perf_counter() - start

    test_acc = float(np.mean([cross_entropy(model.forward(test_ids[i:i + 500]), test_labels[i:i + 500])[2]
                              for i in range(0, len(test_ids), 500)]))
    print(f"trained {steps} steps in {elapsed:.1f} s")
    print(f"test accuracy: {test_acc:.3f} (chance {1 / VOCAB:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
