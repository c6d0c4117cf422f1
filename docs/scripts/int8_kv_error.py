"""The int8 K/V error table of docs/user_guide/serving.md, measured on LLM-like keys and values.

Run from the repository root:  python docs/scripts/int8_kv_error.py  (a few seconds on 2 cores).

Data (seed 0): D = 128, 32 query heads over 8 kv heads (GQA 4), 4096 cached tokens, 16 queries per head,
every query attending every key (decode rows, causal=False).

* keys: standard normal, and 4 of the 128 channels (the same in every head) 10-20x larger, as the keys of
  real LLMs have a few outlier channels; a token's int8 key scale is then set by those channels. A control
  row uses the same keys without the outliers;
* values: standard normal;
* queries: correlated with the keys: each is the mean of 4 random keys of its kv head plus standard normal
  noise, so every row prefers a few keys; then scaled so that a row's logits (q·k/sqrt(D)) have a standard
  deviation σ of 3 (a moderate softmax) or 14 (a sharp one: most rows dominated by one key; the queries as
  built over the outlier keys have about this σ).

Compared with the float32 K/V output of the same fused kernel with the same float32 queries:

* int8 K/V: fusedattn.quantize_kv (symmetric, one scale per token and kv head), then
  attention(q, k8, v8, k_scale=, v_scale=);
* bfloat16 K/V: the bfloat16 cache path, q, k and v in bfloat16 (float32 accumulation, out_dtype=np.float32).

Bounds derived from the scales, checked on every (query, key) pair and value element:
|Δs_ij| <= scale * Σ_d |q_id| * k_scale_j / 2 (Δs: the logit error) and |Δv_jd| <= v_scale_j / 2.
"""
import subprocess

import ml_dtypes
import numpy as np

import fusedattn as fa

B, HQ, HKV, L, LQ, D = 1, 32, 8, 4096, 16, 128
SCALE = 1 / np.sqrt(D)
rng = np.random.default_rng(0)
kv_head = np.arange(HQ) // (HQ // HKV)

gain = np.ones(D)
gain[rng.choice(D, 4, replace=False)] = rng.uniform(10, 20, 4)
plain = rng.standard_normal((B, HKV, L, D))
v = rng.standard_normal((B, HKV, L, D)).astype(np.float32)
picks = rng.integers(0, L, (HQ, LQ, 4))
noise = rng.standard_normal((B, HQ, LQ, D))
v8, vs = fa.quantize_kv(v)
bf = ml_dtypes.bfloat16


def logits(q, k):
    return SCALE * np.einsum("hid,hjd->hij", q[0].astype(np.float64), k[0][kv_head].astype(np.float64))


print("| keys | queries | K/V | max abs err | mean abs err | max / RMS(out) | mean / RMS(out) | max abs Δs "
      "| Δs bound |")
print("|---|---|---|---|---|---|---|---|---|")
worst_ratio = 0.0
key_sets = (("4 outlier channels", (plain * gain).astype(np.float32)), ("no outliers", plain.astype(np.float32)))
for keys_label, k in key_sets:
    k8, ks = fa.quantize_kv(k)
    q_raw = k[0][kv_head[:, None, None], picks].mean(axis=-2)[None] + noise
    for target in (3.0, 14.0):
        q = (q_raw * (target / logits(q_raw, k).std(-1).mean())).astype(np.float32)
        sharp = float(fa.attention_weights(q, k).max(-1).mean())
        q_label = f"σ={target:.0f}, mean max weight {sharp:.2f}"
        ref = fa.attention(q, k, v).astype(np.float64)
        rms = float(np.sqrt(np.mean(ref ** 2)))
        out8 = fa.attention(q, k8, v8, k_scale=ks, v_scale=vs)
        out16 = fa.attention(q.astype(bf), k.astype(bf), v.astype(bf), out_dtype=np.float32)
        dk = (k8.astype(np.float64) * ks[..., None] - k)
        ds = np.abs(logits(q, dk))
        bound = SCALE * np.abs(q[0].astype(np.float64)).sum(-1)[..., None] * ks[0][kv_head][:, None, :] / 2
        assert np.all(ds <= bound), "the logit error bound does not hold"
        worst_ratio = max(worst_ratio, float((ds / bound).max()))
        for name, out in (("int8", out8), ("bfloat16", out16)):
            err = np.abs(out - ref)
            tail = f"{ds.max():.3f} | {bound.max():.3f}" if name == "int8" else "|"
            print(f"| {keys_label} | {q_label} | {name} | {err.max():.2e} | {err.mean():.2e} | {err.max() / rms:.2e} | "
                  f"{err.mean() / rms:.2e} | {tail} |")

print(f"\nlogits: the largest |Δs_ij| / its own bound: {worst_ratio:.2f}")
dv = np.abs(v8.astype(np.float64) * vs[..., None] - v)
print(f"values: max |Δv| {dv.max():.4f}, every |Δv_jd| <= v_scale_j / 2: {bool(np.all(dv <= vs[..., None] / 2))}")
print(f"bytes per token and kv head (K+V): float32 {8 * D}, bfloat16 {4 * D}, int8 {2 * D} + 8 (two float32 scales)")
try:
    cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
except Exception:  # no lscpu
    cpu = "unknown"
print(f"fusedattn {fa.__version__}, ISA level {fa.backend_info().get('isa')}, CPU {cpu}")
