"""KV-cache decoding: the time per token stays flat
================================================

Generating token ``t`` needs attention of one new query over all ``t`` earlier keys and values. Without a
cache, each step re-projects the whole prefix into keys and values: the step's cost grows with ``t``, and the
whole generation is quadratic. A :class:`fusedattn.KVCache` keeps the projected keys and values in buffers
allocated once: a step projects only the new token, appends it in place and attends with one fused call over
the cache's strided view — nothing is copied or re-allocated, and the time per token stays nearly flat
(the attention itself reads ``t`` keys, a small linear term).

The "model" is one attention layer with random projections (embedding 256, 8 query heads over 2 kv heads).
"""
import time

import matplotlib.pyplot as plt
import numpy as np

import fusedattn

E, HQ, HKV, D, STEPS = 256, 8, 2, 32, 384
rng = np.random.default_rng(0)
w_q = rng.standard_normal((E, HQ * D), dtype=np.float32) / E ** 0.5
w_kv = rng.standard_normal((E, 2 * HKV * D), dtype=np.float32) / E ** 0.5
tokens = rng.standard_normal((STEPS, E), dtype=np.float32)          # the embedded tokens, one per step


def heads(x, h):
    """(L, h * D) -> (1, h, L, D)"""
    return x.reshape(1, -1, h, D).swapaxes(1, 2)


def step_without_cache(t):
    kv = tokens[: t + 1] @ w_kv                                      # re-project the whole prefix
    k, v = heads(kv[:, : HKV * D], HKV), heads(kv[:, HKV * D:], HKV)
    return fusedattn.attention(heads(tokens[t: t + 1] @ w_q, HQ), k, v)


cache = fusedattn.KVCache(1, HKV, max_len=STEPS, head_dim=D)


def step_with_cache(t):
    kv = tokens[t: t + 1] @ w_kv                                     # project the new token only
    cache.append(heads(kv[:, : HKV * D], HKV), heads(kv[:, HKV * D:], HKV))
    return cache.attend(heads(tokens[t: t + 1] @ w_q, HQ))


def time_steps(step, runs=3):
    """Seconds of each step, the minimum over ``runs`` whole generations (other load only adds time)."""
    times = np.full(STEPS, np.inf)
    for _ in range(runs):
        cache.reset()
        for t in range(STEPS):
            start = time.perf_counter()
            out = step(t)
            times[t] = min(times[t], time.perf_counter() - start)
    return times, out


threads = fusedattn.get_num_threads()
fusedattn.set_num_threads(1)        # one thread: a steady per-step time on a shared machine
for _ in range(3):                   # warm up: thread pool, BLAS, page faults
    step_without_cache(STEPS - 1)
uncached, last_uncached = time_steps(step_without_cache)
cached, last_cached = time_steps(step_with_cache)
fusedattn.set_num_threads(threads)
print(f"last step, max |cached - uncached| = {np.abs(last_cached - last_uncached).max():.1e}")


def smooth(x, n=16):
    """Median over windows of n steps: one step takes tens of microseconds, so single timings are noisy."""
    return np.array([np.median(x[max(0, i - n): i + 1]) for i in range(len(x))])


for name, times in (("without cache", uncached), ("with KVCache", cached)):
    early, late = np.median(times[16:48]) * 1e6, np.median(times[-32:]) * 1e6
    print(f"{name:>14}: {early:7.1f} us/token at t~32, {late:7.1f} us/token at t~{STEPS - 16} ({late / early:.1f}x)")

# %%
# Time per token
# --------------
fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
steps = np.arange(STEPS)
ax.plot(steps, smooth(uncached) * 1e6, color="#e07b24", label="no cache: re-project the prefix every step")
ax.plot(steps, smooth(cached) * 1e6, color="#1f4e9c", label="fusedattn.KVCache: append + attend")
ax.set_xlabel("decoding step t (tokens already generated)")
ax.set_ylabel("time per token (µs)")
ax.set_ylim(0, None)
ax.set_title("One attention layer (E=256, 8 query heads over 2 kv heads, 1 thread):\n"
             "best of 3 generations per step, median over 16 steps", fontsize=10)
ax.legend()
ax.grid(alpha=0.3)
plt.show()
