"""The amx level (Intel AMX tiles, issue #13) against the float64 reference.

Everything here runs on the exact software model of the tile instructions (``conftest.amx_emulation``:
LDTILECFG / TILELOADD / TILESTORED / TDPBF16PS / TDPFP16PS as the Intel SDM states them), so the whole
AMX code path - K / V panels, Q^T and P^T pairs, the tile loops, every edge - is tested on any AVX-512
CPU, in CI. Where the CPU has AMX, ``test_native_tiles_agree_with_the_model`` runs the same calls on the
tiles and requires the same bits. The 16-bit suites (tests/test_half.py and the rest) also run on this
level through the ``isa`` fixture's ``amx-model`` parameter; this file adds the tile modes of float32
(precision="high" / "medium"), the AMX-FP16 model, every option of the forward pass on every mode,
awkward sizes and the multi-wave panel packing.

Tolerances (max abs error against float64, unit-normal q, k, v, so outputs are O(1)):
* float32 "high" (bf16x3): each operand is hi + lo, both bfloat16 (8 significant bits each), so it keeps
  ~16 bits: relative error <= 2^-17 ~ 8e-6 per operand, and the dropped lo.lo term is 2^-18. Scores and
  outputs are sums of such products; measured max errors are 2e-6 .. 9e-6. 5e-5 leaves ~5x headroom and
  still catches any real bug (a wrong key or a missing rescale moves outputs by >= 1e-3).
* float32 "medium" (one bf16 product): operands keep 8 bits, 2^-9 ~ 2e-3 relative; measured max errors
  7e-4 .. 5e-3. 2e-2 allows the worst row of a long sum; a wrong answer is O(0.1 .. 1).
* float16: the three-product split is exact for float16 operands, so the error is the float16 output's
  rounding (2^-11 ~ 5e-4 relative, |out| < 3): 2e-3.  float16 on AMX-FP16 rounds P to float16 as well
  (as torch does): the same bound holds with P's 2^-11 relative error averaged over the keys.
* bfloat16: output rounding 2^-9 ~ 2e-3 relative (|out| < 3) plus P rounded to bfloat16 for P.V: 1.6e-2.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import fusedattn
from conftest import amx_emulation, amx_model_available
from fusedattn import _backend, reference

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - ml_dtypes is in the [test] extra
    ml_dtypes = None

pytestmark = pytest.mark.skipif(not amx_model_available(),
                                reason="the amx level is not compiled in, or this CPU cannot run its software model "
                                       "(it needs the avx512 level)")

# name: (input dtype, precision, emulation mode, tolerance)
MODES = {
    "f32-high": (np.float32, "high", 1, 5e-5),
    "f32-medium": (np.float32, "medium", 1, 2e-2),
    "f16": (np.float16, "highest", 1, 2e-3),
    "f16-amxfp16": (np.float16, "highest", 2, 2e-3),
    "bf16": ("bfloat16", "highest", 1, 1.6e-2),
}

OPTIONS = {
    "plain": {},
    "causal": {"causal": True},
    "bottom_right": {"causal": "bottom_right"},
    "window": {"window": (7, 3)},
    "causal_window": {"causal": True, "window": (16, 0)},
    "alibi": {"alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625], np.float32)},
    "softcap": {"softcap": 2.5},
    "dropout": {"dropout_p": 0.3, "seed": 1234},
    "positions": {"causal": "bottom_right", "q_start": 9, "k_start": 3, "dropout_p": 0.2, "seed": 5},
    "bool_mask": {"mask": "bool"},
    "float_mask": {"mask": "float"},
}


def dtype_of(name):
    if name == "bfloat16":
        if ml_dtypes is None:
            pytest.skip("bfloat16 needs ml_dtypes: pip install ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_inputs(rng, dtype, lq, lk, d, dv, hq=4, hkv=2, batch=2):
    q = rng.standard_normal((batch, hq, lq, d)).astype(dtype)
    k = rng.standard_normal((batch, hkv, lk, d)).astype(dtype)
    v = rng.standard_normal((batch, hkv, lk, dv)).astype(dtype)
    return q, k, v


def resolve_options(rng, option, lq, lk):
    kwargs = dict(OPTIONS[option])
    if kwargs.get("mask") == "bool":
        mask = rng.random((lq, lk)) < 0.7
        mask[0] = False  # a row that attends nothing: output 0, lse -inf
        kwargs["mask"] = mask
    elif kwargs.get("mask") == "float":
        mask = (rng.standard_normal((4, 1, lk)) * 2).astype(np.float32)  # broadcast over the queries
        mask[..., lk // 2] = -np.inf
        kwargs["mask"] = mask
    return kwargs


def f64(x):
    return np.asarray(x).astype(np.float64)


def run_amx(mode, q, k, v, **kwargs):
    _, precision, emulation, _ = MODES[mode]
    with amx_emulation(emulation):
        assert fusedattn.backend_info()["isa"] == "amx"
        return fusedattn.attention(q, k, v, precision=precision, **kwargs)


def check_against_reference(mode, q, k, v, kwargs):
    tolerance = MODES[mode][3]
    out, lse = run_amx(mode, q, k, v, return_lse=True, **kwargs)
    ref_kwargs = {name: (f64(x) if isinstance(x, np.ndarray) and x.dtype != np.bool_ else x)
                  for name, x in kwargs.items()}
    want, want_lse = reference.attention(f64(q), f64(k), f64(v), return_lse=True, **ref_kwargs)
    assert out.dtype == q.dtype and lse.dtype == np.float32
    np.testing.assert_allclose(f64(out), want, atol=tolerance, rtol=0)
    live = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isfinite(lse), live)  # rows that attend nothing: lse -inf, out 0
    np.testing.assert_allclose(f64(lse)[live], want_lse[live], atol=tolerance, rtol=tolerance)
    assert not np.any(f64(out)[~live])
    return out


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("mode", list(MODES))
def test_every_option_on_every_mode(mode, option, rng):
    dtype = dtype_of(MODES[mode][0])
    lq, lk = 70, 133  # neither a multiple of a tile (16) nor of a block (64)
    q, k, v = make_inputs(rng, dtype, lq, lk, 40, 24)
    check_against_reference(mode, q, k, v, resolve_options(rng, option, lq, lk))


# (Lq, Lk, D, Dv): the sizes around the tiles (16 rows, 32-deep, 64-key blocks), D and Dv from 1 to 512,
# Lq = 1 and 3 (the decode layout, which stays on vectors) and Lq = 5 (the smallest prefill).
SHAPES = [(1, 50, 64, 64), (3, 17, 8, 8), (5, 3, 1, 1), (7, 77, 40, 24), (16, 16, 32, 16), (17, 33, 33, 17),
          (64, 64, 64, 64), (65, 129, 96, 80), (130, 64, 8, 3), (33, 200, 256, 130), (20, 70, 512, 512)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["f32-high", "f16", "bf16"])
def test_sizes_around_the_tiles(mode, shape, rng):
    lq, lk, d, dv = shape
    q, k, v = make_inputs(rng, dtype_of(MODES[mode][0]), lq, lk, d, dv)
    check_against_reference(mode, q, k, v, {"causal": "bottom_right"} if lq <= lk else {})


@pytest.mark.parametrize("mode", ["f32-high", "bf16"])
def test_strided_inputs_and_out(mode, rng):
    dtype = dtype_of(MODES[mode][0])
    base_q = rng.standard_normal((2, 6, 90, 2 * 48)).astype(dtype)
    base_kv = rng.standard_normal((2, 100, 3, 2 * 48)).astype(dtype)
    q = base_q[:, ::2, ::-1, ::2]                       # heads and dims stepped, queries reversed
    k = np.swapaxes(base_kv, 1, 2)[..., :48]            # (B, L, H, D) memory
    v = np.swapaxes(base_kv, 1, 2)[..., 1::2]           # odd start, stepped dims
    out = np.zeros((2, 3, 90, 48), np.float32)
    got = run_amx(mode, q, k, v, causal=True, out=out, out_dtype=np.float32)
    assert got is out
    want = reference.attention(f64(q), f64(k), f64(v), causal=True)
    np.testing.assert_allclose(out, want, atol=MODES[mode][3], rtol=0)
    # The same values, contiguous, give the same bits: the layout changes nothing but the packing.
    same = run_amx(mode, np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v), causal=True,
                   out_dtype=np.float32)
    np.testing.assert_array_equal(same, out)


def test_key_splits_and_panel_waves(rng):
    # One query block per head and few heads: the keys are split across work items and merged by their
    # logsumexp. Lk x D this large makes one kv head's panels exceed half the 64 MiB budget, so the two kv
    # heads are packed and run in two waves.
    q, k, v = make_inputs(rng, np.float32, 8, 8200, 512, 512, hq=2, hkv=2, batch=1)
    check_against_reference("f32-high", q, k, v, {})


@pytest.mark.parametrize("mode", ["f32-high", "f16"])
def test_varlen_and_block_diagonal(mode, rng):
    dtype = dtype_of(MODES[mode][0])
    lengths_q, lengths_k = [5, 70, 1, 33], [9, 64, 20, 1]
    cu_q, cu_k = np.cumsum([0] + lengths_q), np.cumsum([0] + lengths_k)
    q = rng.standard_normal((cu_q[-1], 4, 40)).astype(dtype)
    k = rng.standard_normal((cu_k[-1], 2, 40)).astype(dtype)
    v = rng.standard_normal((cu_k[-1], 2, 24)).astype(dtype)
    with amx_emulation():
        got = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, causal="bottom_right",
                                         precision=MODES[mode][1])
    want = reference.attention_varlen(f64(q), f64(k), f64(v), cu_q, cu_k, causal="bottom_right")
    np.testing.assert_allclose(f64(got), want, atol=MODES[mode][3], rtol=0)


def test_float32_modes_are_taken(rng):
    # "highest" on the amx level is the fp32 FMA path bit for bit; "high" and "medium" run on the tiles,
    # so they differ from it, and "medium" (one bf16 product) is the less accurate of the two.
    q, k, v = make_inputs(rng, np.float32, 64, 96, 64, 64)
    want = reference.attention(f64(q), f64(k), f64(v))
    previous = _backend.force_isa("avx512")  # what the amx level runs for float32 "highest"
    try:
        highest = fusedattn.attention(q, k, v)
    finally:
        _backend.force_isa(previous)
    with amx_emulation():
        on_amx = {mode: fusedattn.attention(q, k, v, precision=mode) for mode in ("highest", "high", "medium")}
    np.testing.assert_array_equal(on_amx["highest"], highest)
    error = {mode: np.abs(out - want).max() for mode, out in on_amx.items()}
    assert error["highest"] < error["high"] < error["medium"], error


def test_amx_fp16_model_rounds_p_to_float16(rng):
    # With AMX-FP16 (emulation mode 2) float16 takes one TDPFP16PS product with P rounded to float16; on
    # AMX-BF16 it takes the exact three-product split, which keeps P to ~16 bits: the results differ.
    q, k, v = make_inputs(rng, np.float16, 64, 96, 64, 64)
    split = run_amx("f16", q, k, v, out_dtype=np.float32)
    fp16 = run_amx("f16-amxfp16", q, k, v, out_dtype=np.float32)
    assert not np.array_equal(split, fp16)
    want = reference.attention(f64(q), f64(k), f64(v))
    assert np.abs(split - want).max() < np.abs(fp16 - want).max()


def test_float16_error_within_torchs(rng):
    torch = pytest.importorskip("torch", reason="the comparison with torch's float16 error needs torch")
    q, k, v = make_inputs(rng, np.float16, 200, 300, 64, 64, hq=4, hkv=4)
    want = reference.attention(f64(q), f64(k), f64(v), causal=True)
    theirs = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), is_causal=True).numpy()
    their_error = np.abs(f64(theirs) - want)
    for mode in ("f16", "f16-amxfp16"):
        ours = np.abs(f64(run_amx(mode, q, k, v, causal=True)) - want)
        # Normwise (mean) and worst case: float16 output rounding dominates both, so ours must not exceed
        # theirs by more than a rounding step on an unlucky element.
        assert ours.mean() <= their_error.mean() * 1.05, (mode, ours.mean(), their_error.mean())
        assert ours.max() <= their_error.max() + 2.0 ** -10, (mode, ours.max(), their_error.max())


def test_python_threads_share_the_level(rng):
    # The tile configuration is loaded per work item and released after it: calls from several Python
    # threads (each with OpenMP threads of its own) never see another call's configuration.
    q, k, v = make_inputs(rng, np.float32, 96, 130, 48, 48)
    with amx_emulation():
        expected = fusedattn.attention(q, k, v, precision="high", num_threads=1)
        results, errors = [None] * 4, []

        def work(slot):
            try:
                for _ in range(3):
                    results[slot] = fusedattn.attention(q, k, v, precision="high", num_threads=2)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(slot,)) for slot in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    for result in results:  # work items never depend on the thread count: the same bits
        np.testing.assert_array_equal(result, expected)


def test_native_tiles_agree_with_the_model(rng):
    amx = fusedattn.backend_info()["amx"]
    if not (amx["cpu"] and amx["os"]):
        pytest.skip(f"this machine cannot run the AMX tiles natively: {amx['reason'] or 'no AMX'}")
    cases = [("f32-high", 70, 133, 40, 24), ("f32-medium", 64, 64, 64, 64), ("f16", 33, 200, 96, 80),
             ("bf16", 130, 64, 128, 128)]
    for mode, lq, lk, d, dv in cases:
        q, k, v = make_inputs(rng, dtype_of(MODES[mode][0]), lq, lk, d, dv)
        previous = _backend.force_isa("amx")
        try:
            native = fusedattn.attention(q, k, v, causal=True, precision=MODES[mode][1])
        finally:
            _backend.force_isa(previous)
        modelled = run_amx(mode, q, k, v, causal=True)
        np.testing.assert_array_equal(native, modelled, err_msg=mode)
