"""Vision: patch self-attention over an image
==========================================

A vision transformer cuts an image into patches and lets every patch attend to every other one. This example
does the attention step on a generated 96×96 picture (no download): a sky gradient, grass, a sun and a few red
and blue shapes. Each 8×8-pixel patch becomes a vector of its mean colour and its texture (colour spread), plus a
small positional term; the patches attend to each other with ``fusedattn.attention`` (one head, 144 patches).

Nothing is trained, so the queries and keys are the raw patch features: a patch attends to patches that look
like it. The attention map of a patch on one red shape lights up the other red shapes, wherever they are, and
not the blue ones — the "which parts of the image go together" signal that trained vision transformers
sharpen into object segmentations.
"""
import matplotlib.pyplot as plt
import numpy as np

import fusedattn

SIZE, PATCH = 96, 8
G = SIZE // PATCH                                      # 12 x 12 patches

# %%
# A generated image
# -----------------
yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
image = np.empty((SIZE, SIZE, 3))
image[...] = np.stack([0.45 + 0.3 * yy, 0.65 + 0.25 * yy, 0.95 - 0.1 * yy], -1)      # sky
grass = yy > 0.62
rng = np.random.default_rng(1)
image[grass] = np.array([0.25, 0.6, 0.2]) + 0.08 * rng.standard_normal((grass.sum(), 3))


def disc(cx, cy, r):
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2


def box(x0, y0, x1, y1):
    return (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)


image[disc(0.82, 0.16, 0.09)] = [1.0, 0.85, 0.2]                       # sun
for shape, colour in [(disc(0.22, 0.75, 0.1), [0.85, 0.1, 0.1]), (box(0.55, 0.7, 0.72, 0.9), [0.85, 0.12, 0.12]),
                      (disc(0.3, 0.3, 0.08), [0.9, 0.15, 0.1]),             # a red balloon in the sky
                      (box(0.78, 0.68, 0.95, 0.85), [0.1, 0.2, 0.85]), (disc(0.55, 0.35, 0.07), [0.15, 0.2, 0.9])]:
    image[shape] = colour
image = np.clip(image, 0, 1)

# %%
# Patches, features and self-attention
# ------------------------------------
patches = image.reshape(G, PATCH, G, PATCH, 3).swapaxes(1, 2).reshape(G * G, PATCH * PATCH, 3)
mean, spread = patches.mean(1), patches.std(1)
rows, cols = np.divmod(np.arange(G * G), G)
position = 0.15 * np.stack([rows, cols], -1) / G                     # a weak "where" next to the strong "what"
features = np.concatenate([mean, 2 * spread, position], -1).astype(np.float32)   # (144, 8)
features -= features.mean(0)

x = features[None]                                                    # (1 head, 144 patches, 8)
out = fusedattn.attention(x, x, x, scale=40.0)                        # what each patch gathers from the image
weights = fusedattn.attention_weights(x, x, scale=40.0)[0]            # (144, 144): row i = patch i's attention
print(f"{G * G} patches of {PATCH}x{PATCH} px, features {features.shape[1]}; output {out.shape}")

chosen = 9 * G + 2                                                    # a patch inside the red disc, bottom left
is_red = (mean[:, 0] > 0.6) & (mean[:, 2] < 0.4) & (mean[:, 1] < 0.4)
is_blue = (mean[:, 2] > 0.6) & (mean[:, 0] < 0.4)
print(f"chosen patch (row 9, col 2) is red: {bool(is_red[chosen])}")
print(f"its attention on red patches: {weights[chosen, is_red].sum():.2f}, on blue patches: "
      f"{weights[chosen, is_blue].sum():.2f} ({is_red.sum()} red and {is_blue.sum()} blue of {G * G} patches)")

# %%
# The attention map of one patch
# ------------------------------
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.8), layout="constrained")
left.imshow(image, extent=(0, SIZE, SIZE, 0))
r, c = divmod(chosen, G)
left.add_patch(plt.Rectangle((c * PATCH, r * PATCH), PATCH, PATCH, fill=False, edgecolor="white", linewidth=2))
left.set_title("generated image; the chosen patch (white square)")
left.set_xlabel("x (pixels)")
left.set_ylabel("y (pixels)")
right.imshow(image.mean(-1), cmap="gray", extent=(0, SIZE, SIZE, 0), alpha=0.5)
shown = right.imshow(weights[chosen].reshape(G, G), cmap="inferno", extent=(0, SIZE, SIZE, 0), alpha=0.8)
right.add_patch(plt.Rectangle((c * PATCH, r * PATCH), PATCH, PATCH, fill=False, edgecolor="cyan", linewidth=2))
right.set_title("its attention weights over the 12×12 patches")
right.set_xlabel("x (pixels)")
fig.colorbar(shown, ax=right, label="attention weight")
plt.show()
