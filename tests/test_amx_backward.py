"""The bfloat16 backward on AMX tiles (issue 13, part 5), run on the exact software model of the tile
instructions (``set_amx_emulation``) so it is tested on any AVX-512 CPU.

Oracle. The truth is ``fusedattn.reference.attention_backward`` in float64 on the bfloat16 inputs upcast
exactly; the error of a gradient is normwise (``max|got - truth| / max|truth|``, and the same with the mean).
The tile path must be within ``FACTOR`` of the avx512 path's bfloat16 backward on the very same inputs
(its error measured here, a relative oracle), plus a floor for the float32 differences of a different
summation order. Why 1.25: both paths compute every gradient in float32 to ~1e-6 and round it once to
bfloat16 (P and dS enter the tiles as two bfloat16 planes, ~2^-16 relative), so their errors agree to the
printed digits (measured: ratio 1.00 for max and mean on every case here); rounding P and dS to one
bfloat16 plane instead measured 1.4-1.6x in the mean, which 1.25 catches. The floors (1e-5 normwise max,
1e-6 mean) are far below one bfloat16 half-ulp (2^-9 ~ 2e-3).
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import fusedattn
from fusedattn import _backend, reference
from conftest import amx_emulation, amx_model_available

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes (pip install ml_dtypes)")
BF16 = ml_dtypes.bfloat16

pytestmark = pytest.mark.skipif(
    not amx_model_available(),
    reason="needs the amx level compiled in and an AVX-512 CPU to run its software model")

FACTOR = 1.25
FLOOR, MEAN_FLOOR = 1e-5, 1e-6


def f64(x):
    return np.asarray(x).astype(np.float64)


def normwise(got, truth, reduce=np.max) -> float:
    got, truth = f64(got), f64(truth)
    if truth.size == 0:
        return 0.0
    return float(reduce(np.abs(got - truth)) / max(float(np.max(np.abs(truth))), np.finfo(np.float64).tiny))


def bf16_case(seed, lq, lk, d, dv=None, hq=4, hkv=4, batch=2):
    rng = np.random.default_rng(seed)
    dv = d if dv is None else dv
    q = rng.standard_normal((batch, hq, lq, d)).astype(BF16)
    k = rng.standard_normal((batch, hkv, lk, d)).astype(BF16)
    v = rng.standard_normal((batch, hkv, lk, dv)).astype(BF16)
    dout = rng.standard_normal((batch, hq, lq, dv)).astype(BF16)
    return q, k, v, dout


def backward_both(q, k, v, dout, **kwargs):
    """(out, lse, the avx512 gradients, the amx-model gradients) from the same forward result."""
    out, lse = fusedattn.attention(q, k, v, return_lse=True, **kwargs)
    previous = _backend.force_isa("avx512")
    try:
        vector = fusedattn.attention_backward(dout, q, k, v, out, lse, **kwargs)
    finally:
        _backend.force_isa(previous)
    with amx_emulation():
        tiles = fusedattn.attention_backward(dout, q, k, v, out, lse, **kwargs)
    return out, lse, vector, tiles


def zero_gradient_bounds(q, k, v, dout, scale):
    """Bounds on dq and dk where their truth is zero: every query sees one key, so P = 1, dP = delta and dS = 0.

    The tiles sum dP = dout . v_j in another order than delta = dout . out (the hardware's TDPBF16PS keeps
    the even and the odd products apart), so dS keeps the fp32 rounding of two length-Dv dot products:
    |dS| <= 2 * gamma_Dv * Dv * max|dout| * max|v| with gamma_n = n * 2^-24. dq sums one such term times the
    scale and a key, dk at most Lq of them times the scale and a query. dv = P^T dout cancels nothing.
    """
    dv = v.shape[-1]
    ds = 2 * dv * 2.0**-24 * dv * np.abs(f64(dout)).max() * np.abs(f64(v)).max()
    return {"dq": scale * ds * np.abs(f64(k)).max(), "dk": scale * ds * np.abs(f64(q)).max() * q.shape[-2], "dv": 0.0}


def assert_relative_oracle(tiles, vector, truth, what, zero_bounds=None):
    for name, got, theirs, want in zip(("dq", "dk", "dv"), tiles, vector, truth):
        assert got.dtype == BF16 and got.shape == want.shape, name
        assert np.all(np.isfinite(f64(got))), f"{what} {name}: non-finite gradient"
        if zero_bounds is not None and not np.any(f64(want)):  # no scale to be relative to
            worst = float(np.abs(f64(got)).max())
            assert worst <= zero_bounds[name], f"{what} {name}: {worst:.3g} where the truth is 0 (bound {zero_bounds[name]:.3g})"
            continue
        err, err_vec = normwise(got, want), normwise(theirs, want)
        assert err <= FACTOR * err_vec + FLOOR, (
            f"{what} {name}: normwise error {err:.3g} exceeds {FACTOR} x the avx512 path's ({err_vec:.3g})")
        mean, mean_vec = normwise(got, want, np.mean), normwise(theirs, want, np.mean)
        assert mean <= FACTOR * mean_vec + MEAN_FLOOR, (
            f"{what} {name}: mean error {mean:.3g} exceeds {FACTOR} x the avx512 path's ({mean_vec:.3g})")


# (Lq, Lk, D, Dv, Hq, Hkv): one query / key, below a tile, a block plus one, tails; D and Dv odd multiples.
SHAPES = [
    (1, 1, 8, 8, 4, 4), (1, 65, 40, 40, 4, 4), (7, 1, 64, 64, 4, 4), (7, 65, 40, 40, 4, 4),
    (77, 200, 64, 64, 4, 2), (130, 130, 96, 40, 4, 4), (130, 65, 128, 128, 4, 2), (64, 64, 8, 24, 4, 4),
    (77, 200, 128, 64, 4, 4), (7, 200, 40, 96, 4, 2), (33, 45, 3, 5, 2, 1),
]
OPTIONS = {
    "plain": {},
    "causal": {"causal": True},
    "bottom_right": {"causal": "bottom_right"},
    "window": {"window": (20, 5)},
    "softcap": {"softcap": 5.0},
    "dropout": {"dropout_p": 0.25, "seed": 7},
    "alibi_scale": {"alibi_slopes": "alibi", "scale": 0.3},
}


def resolve(kwargs, heads):
    kwargs = dict(kwargs)
    if kwargs.get("alibi_slopes") == "alibi":
        kwargs["alibi_slopes"] = np.linspace(0.05, 0.5, heads).astype(np.float32)
    return kwargs


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_bf16_gradients_relative_oracle(shape, option):
    lq, lk, d, dv, hq, hkv = shape
    q, k, v, dout = bf16_case(zlib.crc32(repr((shape, option)).encode()), lq, lk, d, dv, hq, hkv)
    kwargs = resolve(OPTIONS[option], hq)
    out, lse, vector, tiles = backward_both(q, k, v, dout, **kwargs)
    truth = reference.attention_backward(f64(dout), f64(q), f64(k), f64(v), f64(out), f64(lse), **kwargs)
    scale = kwargs.get("scale", 1 / np.sqrt(d)) / (1 - kwargs.get("dropout_p", 0.0))
    assert_relative_oracle(tiles, vector, truth, f"{shape} {option}", zero_gradient_bounds(q, k, v, dout, scale))


def test_bf16_bool_mask():
    q, k, v, dout = bf16_case(11, 77, 130, 64, 40, 4, 2)
    rng = np.random.default_rng(12)
    mask = rng.random((2, 4, 77, 130)) < 0.6
    mask[0, 1, 3] = False  # a row that attends nothing: its gradients are zero
    out, lse, vector, tiles = backward_both(q, k, v, dout, mask=mask)
    truth = reference.attention_backward(f64(dout), f64(q), f64(k), f64(v), f64(out), f64(lse), mask=mask)
    assert_relative_oracle(tiles, vector, truth, "bool mask")
    assert not np.any(f64(tiles[0])[0, 1, 3])


def test_bf16_varlen():
    rng = np.random.default_rng(21)
    cu_q, cu_k = np.array([0, 5, 75, 205], np.int32), np.array([0, 130, 137, 337], np.int32)
    hq, hkv, d, dv = 4, 2, 40, 24
    q = rng.standard_normal((cu_q[-1], hq, d)).astype(BF16)
    k = rng.standard_normal((cu_k[-1], hkv, d)).astype(BF16)
    v = rng.standard_normal((cu_k[-1], hkv, dv)).astype(BF16)
    dout = rng.standard_normal((cu_q[-1], hq, dv)).astype(BF16)
    kwargs = {"causal": "bottom_right"}
    out, lse = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kwargs)
    previous = _backend.force_isa("avx512")
    try:
        vector = fusedattn.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **kwargs)
    finally:
        _backend.force_isa(previous)
    with amx_emulation():
        tiles = fusedattn.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **kwargs)
    truth = reference.attention_varlen_backward(f64(dout), f64(q), f64(k), f64(v), f64(out), f64(lse), cu_q, cu_k,
                                                **kwargs)
    assert_relative_oracle(tiles, vector, truth, "varlen")


def test_bf16_non_contiguous():
    # (B, L, H, D) layouts through swapaxes views, a value cache sliced from a longer buffer, strided dout.
    rng = np.random.default_rng(31)
    b, hq, hkv, lq, lk, d, dv = 2, 4, 2, 29, 75, 40, 24
    q = rng.standard_normal((b, lq, hq, d)).astype(BF16).swapaxes(1, 2)
    k = rng.standard_normal((b, lk, hkv, d)).astype(BF16).swapaxes(1, 2)
    v = rng.standard_normal((b, hkv, lk + 11, dv)).astype(BF16)[:, :, :lk]
    dout = rng.standard_normal((b, lq, hq, dv)).astype(BF16).swapaxes(1, 2)
    assert not any(x.flags.c_contiguous for x in (q, k, v, dout))
    out, lse, vector, tiles = backward_both(q, k, v, dout, causal="bottom_right")
    truth = reference.attention_backward(f64(dout), f64(q), f64(k), f64(v), f64(out), f64(lse), causal="bottom_right")
    assert_relative_oracle(tiles, vector, truth, "non-contiguous")
    contiguous = backward_both(*(np.ascontiguousarray(x) for x in (q, k, v, dout)), causal="bottom_right")[3]
    for got, want in zip(tiles, contiguous):
        assert np.array_equal(f64(got), f64(want)), "strided inputs changed the gradients"


# One kv head with 1000 keys: 8 key chunks, dQ summed from slices; eight kv heads: one chunk each.
@pytest.mark.parametrize("batch, hq, hkv, lk", [(1, 2, 1, 1000), (2, 8, 4, 200)])
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_bf16_gradients_bit_identical_across_threads(batch, hq, hkv, lk, causal):
    q, k, v, dout = bf16_case(41, 48, lk, 32, 24, hq, hkv, batch)
    out, lse = fusedattn.attention(q, k, v, causal=causal, return_lse=True)
    with amx_emulation():
        first = fusedattn.attention_backward(dout, q, k, v, out, lse, causal=causal, num_threads=1)
        for threads in (2, 1, 2):
            again = fusedattn.attention_backward(dout, q, k, v, out, lse, causal=causal, num_threads=threads)
            for a, b in zip(first, again):
                assert a.tobytes() == b.tobytes(), f"gradients differ at num_threads={threads}"


def test_tile_path_is_taken():
    # The tiles sum in another order than the vector path: for bfloat16 some gradient differs in some bit.
    q, k, v, dout = bf16_case(51, 77, 130, 64)
    _, _, vector, tiles = backward_both(q, k, v, dout)
    assert any(a.tobytes() != b.tobytes() for a, b in zip(vector, tiles)), "the amx level ran the vector backward"
    # float32 is not served by the tiles: the amx level's backward is the avx512 one, bit for bit.
    q32, k32, v32, d32 = (f64(x).astype(np.float32) for x in (q, k, v, dout))
    out, lse = fusedattn.attention(q32, k32, v32, return_lse=True)
    previous = _backend.force_isa("avx512")
    try:
        want = fusedattn.attention_backward(d32, q32, k32, v32, out, lse)
    finally:
        _backend.force_isa(previous)
    with amx_emulation():
        got = fusedattn.attention_backward(d32, q32, k32, v32, out, lse)
    for a, b in zip(got, want):
        assert a.tobytes() == b.tobytes()


def test_native_tiles_match_the_model():
    amx = fusedattn.backend_info()["amx"]
    if not amx.get("os"):
        pytest.skip(f"no native AMX here: {amx.get('reason')}")
    q, k, v, dout = bf16_case(61, 130, 200, 96, 40, 4, 2)
    out, lse = fusedattn.attention(q, k, v, causal=True, return_lse=True)
    with amx_emulation():
        model = fusedattn.attention_backward(dout, q, k, v, out, lse, causal=True)
    with amx_emulation(0):
        assert fusedattn.backend_info()["isa"] == "amx"
        native = fusedattn.attention_backward(dout, q, k, v, out, lse, causal=True)
    for a, b in zip(model, native):
        assert a.tobytes() == b.tobytes(), "native tiles and the software model disagree"
