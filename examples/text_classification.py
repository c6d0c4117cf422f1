"""Text classification: attention pooling over the words of a sentence
===================================================================

Attention pooling for a toy sentiment task: which words does a learned query attend to?

Each sentence is a handful of neutral words plus one sentiment word ("loved", "boring", ...); its label
is that word's polarity. The model pools the word vectors with attention,

    pooled = softmax(q . x_j / sqrt(D) over the sentence's words) . x          (fusedattn.attention)
    p(positive) = sigmoid(w . pooled + b)

and learns q, w and b by gradient descent (the gradients are written out in NumPy; the attention
weights come from fusedattn.attention_weights). Padding positions are masked out with a bool mask
(True = may attend). After training the query puts almost all its weight on the sentiment word,
which the script prints and draws as a heatmap (rows: test sentences, columns: word positions).

Usage:  python examples/text_classification.py [OUTPUT.png]   (default: attention_map.png in the cwd)
The PNG needs matplotlib (pip install 'fusedattn[plot]'); without it the script says it skipped it.
"""
from __future__ import annotations

import argparse

import numpy as np

import fusedattn

NEUTRAL = ["the", "a", "movie", "film", "plot", "actors", "was", "is", "very", "quite", "story", "ending",
           "music", "scenes", "and", "but", "this", "it", "really", "overall"]
POSITIVE = ["great", "wonderful", "loved", "brilliant"]
NEGATIVE = ["awful", "boring", "hated", "terrible"]
VOCAB = NEUTRAL + POSITIVE + NEGATIVE
DIM = 16
MAX_LEN = 10


def make_sentences(rng, n):
    """n sentences of 5..MAX_LEN words with one sentiment word each: (ids (n, MAX_LEN), lengths, labels)."""
    ids = np.zeros((n, MAX_LEN), np.int64)  # padding positions hold id 0 but are masked out
    lengths = rng.integers(5, MAX_LEN + 1, size=n)
    labels = rng.integers(0, 2, size=n)
    for i in range(n):
        ids[i, :lengths[i]] = rng.integers(0, len(NEUTRAL), size=lengths[i])
        pool = POSITIVE if labels[i] else NEGATIVE
        ids[i, rng.integers(0, lengths[i])] = VOCAB.index(pool[rng.integers(0, len(pool))])
    return ids, lengths, labels


def forward(params, x, mask):
    """Pooling weights (n, 1, L), pooled vectors (n, 1, D) and p(positive) (n,)."""
    q = np.broadcast_to(params["q"], (x.shape[0], 1, DIM))  # one shared query, one "head" per sentence
    weights = fusedattn.attention_weights(q, x, mask=mask)
    pooled = fusedattn.attention(q, x, x, mask=mask)
    logits = pooled[:, 0] @ params["w"] + params["b"]
    return weights, pooled, 1.0 / (1.0 + np.exp(-logits))


def train(params, x, mask, labels, steps=300, lr=2.0, decay=0.01):
    scale = 1.0 / np.sqrt(DIM)
    for _ in range(steps):
        a, pooled, p = forward(params, x, mask)
        n = len(labels)
        dlogit = (p - labels) / n                                  # d(mean cross-entropy)/d(logit)
        dpooled = dlogit[:, None] * params["w"]                    # (n, D)
        da = np.einsum("nld,nd->nl", x, dpooled)                   # d/d(weight of word l)
        a = a[:, 0]
        ds = a * (da - (a * da).sum(-1, keepdims=True))            # back through the softmax
        # A little weight decay on w: once the classifier is confident, the loss alone stops pushing the
        # query; keeping w small keeps rewarding a sharper focus on the sentiment word.
        grads = {"q": scale * np.einsum("nl,nld->d", ds, x), "w": pooled[:, 0].T @ dlogit + decay * params["w"],
                 "b": dlogit.sum()}
        for name, grad in grads.items():
            params[name] = (params[name] - lr * grad).astype(np.float32)
    return params


def main(argv=None):
    parser = argparse.ArgumentParser(description="Attention pooling for a toy sentiment task: which words does a learned query attend to?")
    parser.add_argument("output", nargs="?", default="attention_map.png", help="heatmap PNG (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    embeddings = rng.standard_normal((len(VOCAB), DIM)).astype(np.float32)
    train_ids, train_len, train_y = make_sentences(rng, 512)
    test_ids, test_len, test_y = make_sentences(rng, 200)

    def batch(ids, lengths):
        # (n, 1, L) bool mask, True = a real word: broadcast over the one query of each sentence.
        return embeddings[ids], (np.arange(MAX_LEN)[None, :] < lengths[:, None])[:, None, :]

    x, mask = batch(train_ids, train_len)
    params = {"q": np.zeros(DIM, np.float32), "w": np.zeros(DIM, np.float32), "b": np.float32(0.0)}
    params = train(params, x, mask, train_y)

    x_test, mask_test = batch(test_ids, test_len)
    weights, _, p = forward(params, x_test, mask_test)
    weights = weights[:, 0]                                        # (n, L)
    accuracy = float(((p > 0.5) == test_y).mean())
    sentiment = np.isin(test_ids, [VOCAB.index(w) for w in POSITIVE + NEGATIVE]) & mask_test[:, 0]
    on_sentiment = float((weights * sentiment).sum(-1).mean())
    print(f"backend: {fusedattn.backend_info()['isa']}")
    print(f"test accuracy: {accuracy:.3f}")
    print(f"mean attention weight on the sentiment word: {on_sentiment:.3f} (uniform would be {float((1 / test_len).mean()):.3f})")

    shown = range(6)
    print("\nwhich words got the weight (top word marked with *):")
    for i in shown:
        words = [VOCAB[t] for t in test_ids[i, :test_len[i]]]
        top = int(np.argmax(weights[i]))
        cells = [f"{'*' if j == top else ''}{word}:{weights[i, j]:.2f}" for j, word in enumerate(words)]
        print(f"  {'pos' if test_y[i] else 'neg'} p={p[i]:.2f} | " + " ".join(cells))

    try:
        from fusedattn.plot import attention_map

        rows = [f"#{i} {'pos' if test_y[i] else 'neg'} (p={p[i]:.2f})" for i in shown]
        ax = attention_map(weights[list(shown)], query_labels=rows, key_labels=[str(j + 1) for j in range(MAX_LEN)])
    except ImportError as exc:
        print(f"\nPNG skipped: {exc}")
        return 0
    for r, i in enumerate(shown):  # write each word into its cell: the columns are positions, not words
        for j in range(test_len[i]):
            ax.text(j, r, VOCAB[test_ids[i, j]], ha="center", va="center", fontsize=7,
                    color="black" if weights[i, j] > 0.5 else "white")
    ax.set_xlabel("word position (padding is masked: weight 0)")
    ax.set_ylabel("test sentence (one query each)")
    ax.set_title("attention pooling: learned query vs words")
    ax.figure.savefig(args.output, dpi=110)
    print(f"\nsaved heatmap: {args.output}")
    return 0


if __name__ == "__main__":
    main()
