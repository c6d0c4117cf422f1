"""Speech: attention pooling over the frames of a spectrogram
==========================================================

A keyword-spotting toy. Each one-second clip (8 kHz, generated here: no download) holds a constant mains hum,
noise, and at a random moment one short whistle, either **high** (≈ 2.4 kHz) or **low** (≈ 900 Hz): the clip's
class. The whistle fills only a few of the clip's frames, so a classifier that averages all frames sees mostly
hum and noise; one that *attends* to the right frames does not.

The model is the attention pooling of the text example, over audio frames:

* each frame's log-power spectrum in 32 bands is a key and a value (the frames are the "words");
* one learned query scores the frames, ``fusedattn.attention`` pools them,
* a logistic regression on the pooled vector gives p(high).

The gradients are written out in NumPy. The figure shows test clips' spectrograms with the learned attention
over their frames beneath: the weight sits on the whistle, wherever it occurs.
"""
import matplotlib.pyplot as plt
import numpy as np

import fusedattn

RATE, FRAME, HOP, BANDS = 8000, 256, 128, 32
rng = np.random.default_rng(0)


def make_clip(label):
    """One second: hum + noise + a 0.12 s whistle (high if label else low) at a random time."""
    t = np.arange(RATE) / RATE
    clip = 0.3 * np.sin(2 * np.pi * 120 * t) + 0.15 * rng.standard_normal(RATE)
    start = rng.uniform(0.05, 0.8)
    pitch = (2400 if label else 900) * rng.uniform(0.95, 1.05)
    on = (t >= start) & (t < start + 0.12)
    clip[on] += 0.5 * np.sin(2 * np.pi * pitch * (t[on] - start)) * np.hanning(on.sum())
    return clip


def spectrogram(clip):
    """Log power of Hann-windowed frames: (frames, FRAME // 2 + 1)."""
    frames = np.lib.stride_tricks.sliding_window_view(clip, FRAME)[::HOP] * np.hanning(FRAME)
    return np.log(np.abs(np.fft.rfft(frames, axis=-1)) ** 2 + 1e-6)


def bands(spec):
    """Average the spectrogram into BANDS equal-width frequency bands: the frame features."""
    return spec[:, 1:].reshape(spec.shape[0], BANDS, -1).mean(-1)


labels = rng.integers(0, 2, size=300)
specs = np.stack([spectrogram(make_clip(y)) for y in labels])               # (clips, frames, bins)
x = bands(specs.reshape(-1, specs.shape[-1])).reshape(len(labels), -1, BANDS)
x = ((x - x.mean((0, 1))) / x.std((0, 1))).astype(np.float32)              # standardised band powers
train, test = slice(0, 200), slice(200, None)
print(f"{len(labels)} clips of {x.shape[1]} frames x {BANDS} bands; train 200, test {len(labels) - 200}")

# %%
# Train the query and the classifier
# ----------------------------------
# ``fusedattn.attention_weights`` returns the pooling weights (one query per clip, over its frames) and
# ``fusedattn.attention`` the pooled vector; the backward pass through the softmax is three lines of NumPy.

D = BANDS
params = {"q": np.zeros(D, np.float32), "w": np.zeros(D, np.float32), "b": 0.0}


def forward(xs):
    q = np.broadcast_to(params["q"], (xs.shape[0], 1, D))
    weights = fusedattn.attention_weights(q, xs)[:, 0]
    pooled = fusedattn.attention(q, xs, xs)[:, 0]
    p = 1 / (1 + np.exp(-(pooled @ params["w"] + params["b"])))
    return weights, pooled, p


y = labels[train]
for step in range(300):
    a, pooled, p = forward(x[train])
    dlogit = (p - y) / len(y)
    da = np.einsum("nfd,nd->nf", x[train], dlogit[:, None] * params["w"])  # d loss / d weight of frame f
    ds = a * (da - (a * da).sum(-1, keepdims=True))                         # through the softmax
    params["q"] -= 1.0 * (np.einsum("nf,nfd->d", ds, x[train]) / np.sqrt(D)).astype(np.float32)
    params["w"] -= 1.0 * (pooled.T @ dlogit).astype(np.float32)
    params["b"] -= 1.0 * dlogit.sum()

weights, _, p = forward(x[test])
accuracy = ((p > 0.5) == labels[test]).mean()
# Where is the whistle? The frames whose energy in the whistle's band stands out the most.
loud = x[test].max(-1)
top_is_whistle = np.mean([abs(np.argmax(w) - np.argmax(e)) <= 2 for w, e in zip(weights, loud)])
print(f"test accuracy: {accuracy:.3f}")
print(f"most-attended frame within 2 frames of the whistle: {top_is_whistle:.0%} of test clips")

# %%
# Spectrograms and the attention over their frames
# ------------------------------------------------

test_labels = labels[test]
shown = [*np.flatnonzero(test_labels == 0)[:2], *np.flatnonzero(test_labels == 1)[:2]]  # two of each class
top = 1.15 * weights[shown].max()
frame_time = (np.arange(x.shape[1]) * HOP + FRAME / 2) / RATE
freqs = np.fft.rfftfreq(FRAME, 1 / RATE)
fig, axes = plt.subplots(2, len(shown), figsize=(12, 5.5), sharex=True, height_ratios=[3, 1.2],
                         layout="constrained")
for col, i in enumerate(shown):
    n = 200 + i
    axes[0, col].pcolormesh(frame_time, freqs / 1000, specs[n].T, shading="nearest", cmap="magma")
    axes[0, col].set_title(f"test clip {i}: {'high' if labels[n] else 'low'} whistle (p(high)={p[i]:.2f})",
                           fontsize=9)
    axes[1, col].bar(frame_time, weights[i], width=HOP / RATE, color="#1f4e9c")
    axes[1, col].set_xlabel("time (s)")
    axes[1, col].set_ylim(0, top)
axes[0, 0].set_ylabel("frequency (kHz)")
axes[1, 0].set_ylabel("attention weight")
fig.suptitle("Learned attention over audio frames (top: log-power spectrogram; bottom: pooling weights)")
plt.show()
