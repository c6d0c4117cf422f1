"""Sliding-window attention costs O(L * window), not O(L^2): the kernel skips key tiles outside the band.

Rows (float32, 1 x 8 heads x L x L x D=64, fusedattn only):

* ``window-L4096`` and ``window-L16384``: causal with ``window=(256, 0)`` (each query sees itself and the
  256 keys before it). Quadrupling L should roughly quadruple the time: the work per row is constant.
* ``causal-L4096``: plain causal attention, the quadratic baseline (~8x the windowed FLOPs at L = 4096).
  Full causal at L = 16384 is left out: 16x the work of L = 4096 (~275 GFLOP), several seconds per call
  on a small machine, times the warm-up and repeated rounds of a benchmark; it adds nothing the 4096 row
  does not already show.

``extra_info``: ``ms`` (best round), ``visible_keys_per_row`` (averaged over the rows: the first rows of a
causal window see fewer than 257 keys), ``gflop`` and ``gflops`` with FLOPs = 4 * B * H * Lq *
visible_keys_per_row * D (two matrix products, QK^T and PV, of 2 FLOPs per multiply-add over the keys
actually visible; for full causal that is the usual half of 4 * B * H * L^2 * D), and for the 16384 row
``time_vs_L4096`` (expected ~4: ``flop_ratio_vs_L4096``). Before timing, each row's last queries are
checked against the float64 reference on just the keys they may see.

Run (the benchmarks are not in the default ``pytest`` run, whose testpaths is ``tests``)::

    PYTHONPATH=... python -m pytest benchmarks/test_window_speed.py --benchmark-only -q

``--attn-threads N`` sets the thread count (default: fusedattn.get_num_threads()). A quick smoke run without
timing, which also runs the non-benchmark correctness check below (window == explicit band mask)::

    PYTHONPATH=... python -m pytest benchmarks/test_window_speed.py --benchmark-disable -q

or a one-off comparison without pytest::

    python -c "import numpy as np, fusedattn as fa; from fusedattn import _bench; \\
        q, k, v = _bench.make_inputs(_bench.parse_shape('1x8x4096x4096x64')); \\
        w = _bench.time_best(lambda: fa.attention(q, k, v, causal=True, window=(256, 0))).best_s; \\
        c = _bench.time_best(lambda: fa.attention(q, k, v, causal=True)).best_s; \\
        print(f'window {w*1e3:.1f} ms, causal {c*1e3:.1f} ms, {c/w:.1f}x')"
"""
import numpy as np
import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark: pip install fusedattn[bench]")

import fusedattn  # noqa: E402  (after the skip: without the plugin there is nothing to run)
from fusedattn import _bench, reference  # noqa: E402

B, H, D = 1, 8, 64
WINDOW = (256, 0)
# (label, L, window); window None = full causal.
ROWS = [("window-L4096", 4096, WINDOW), ("window-L16384", 16384, WINDOW), ("causal-L4096", 4096, None)]

# The checked rows: float32 kernel vs the float64 reference over <= 4096 keys; conftest's 2e-5 budget for
# O(1) scores (tests/conftest.py) with 5x room for the longer sums of the full-causal rows.
CHECK_ROWS, CHECK_TOL = 16, 1e-4


def visible_keys_per_row(length, window):
    """Average over the L rows of the keys a causal row may see: i + 1, or min(i, left) + 1 with a window."""
    rows = np.arange(length)
    seen = rows + 1 if window is None else np.minimum(rows, window[0]) + 1
    return float(seen.mean())


def flops(length, window):
    return 4.0 * B * H * length * visible_keys_per_row(length, window) * D


def _check_last_rows(q, k, v, out, length, window):
    """The last CHECK_ROWS queries against the reference, given only the keys they may see (top-left causal
    in global positions: q_start / k_start place the slices), so the check stays cheap at L = 16384."""
    q0 = length - CHECK_ROWS
    k0 = 0 if window is None else max(0, q0 - window[0])
    want = reference.attention(q[..., q0:, :], k[..., k0:, :], v[..., k0:, :], causal=True, window=window,
                               q_start=q0, k_start=k0)
    np.testing.assert_allclose(out[..., q0:, :], want, rtol=CHECK_TOL, atol=CHECK_TOL)


@pytest.mark.parametrize(("label", "length", "window"), ROWS, ids=[r[0] for r in ROWS])
def test_window_speed(benchmark, label, length, window, threads, best_s):
    """Time one causal call with or without the sliding window; record ms, visible keys and GFLOP/s."""
    q, k, v = _bench.make_inputs(_bench.Shape(B, H, length, length, D, True), np.float32)
    out = np.empty_like(q)

    def run():
        return fusedattn.attention(q, k, v, causal=True, window=window, out=out, num_threads=threads)

    run()
    _check_last_rows(q, k, v, out, length, window)

    benchmark.group = "sliding window (causal, 1x8xLxLx64 fp32)"
    benchmark.extra_info.update(
        label=label, dims=[B, H, length, length, D], dtype="float32", causal=True,
        window=None if window is None else list(window), threads=threads,
        visible_keys_per_row=visible_keys_per_row(length, window), gflop=flops(length, window) / 1e9,
        flop_convention="4*B*H*Lq*(visible keys per row, averaged)*D",
    )
    seconds = _bench.run_benchmark(benchmark, run, target_s=1.0, min_reps=5)
    if seconds is None:  # --benchmark-disable: one untimed call
        return
    best_s[label] = seconds
    benchmark.extra_info.update(ms=seconds * 1e3, gflops=flops(length, window) / seconds / 1e9)
    if label == "window-L16384" and "window-L4096" in best_s:
        # O(L * window): ~4 for 4x the rows. O(L^2) would be ~16.
        benchmark.extra_info["time_vs_L4096"] = seconds / best_s["window-L4096"]
        benchmark.extra_info["flop_ratio_vs_L4096"] = flops(16384, WINDOW) / flops(4096, WINDOW)


def test_window_equals_band_mask():
    """Not a benchmark: skipping the tiles outside the band gives what masking them would.

    The same scores through the full causal kernel with an explicit boolean band mask (every tile computed,
    then masked) at L = 1024 (several 64-key tiles on each side of the band edges). Both are float32 kernels
    computing the same sums in nearly the same order: conftest's 2e-5 applies.
    """
    length = 1024
    q, k, v = _bench.make_inputs(_bench.Shape(1, 2, length, length, D, True), np.float32)
    rows, keys = np.arange(length)[:, None], np.arange(length)[None, :]
    band = (keys <= rows) & (keys >= rows - WINDOW[0])
    windowed = fusedattn.attention(q, k, v, causal=True, window=WINDOW)
    masked = fusedattn.attention(q, k, v, mask=band)
    np.testing.assert_allclose(windowed, masked, rtol=2e-5, atol=2e-5)
