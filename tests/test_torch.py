"""Agreement with torch.nn.functional.scaled_dot_product_attention (skipped without torch)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (optional: pip install torch==2.13.0)")
F = torch.nn.functional

import fusedattn  # noqa: E402
from conftest import make_qkv  # noqa: E402

DTYPES = [np.float32, np.float64]
# Both sides carry their own rounding error against the exact result (each within the budget of
# conftest.TOL: 2e-5 in float32, 1e-12 in float64), so their difference gets twice that budget.
TORCH_TOL = {np.dtype(np.float32): dict(atol=4e-5, rtol=4e-5), np.dtype(np.float64): dict(atol=2e-12, rtol=2e-12)}


def sdpa(q, k, v, **kwargs):
    t = {name: torch.from_numpy(np.ascontiguousarray(x)) for name, x in (("q", q), ("k", k), ("v", v))}
    mask = kwargs.pop("attn_mask", None)
    if mask is not None:
        kwargs["attn_mask"] = torch.from_numpy(np.ascontiguousarray(mask))
    with torch.no_grad():
        return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], **kwargs).numpy()


def assert_matches_torch(ours, theirs):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    np.testing.assert_allclose(ours, theirs, **TORCH_TOL[ours.dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_plain_and_scale(isa, rng, dtype):
    q, k, v = make_qkv(rng, 37, 53, 64, 48, batch=(2,), hq=4, dtype=dtype)
    assert_matches_torch(fusedattn.attention(q, k, v), sdpa(q, k, v))
    assert_matches_torch(fusedattn.attention(q, k, v, scale=0.3), sdpa(q, k, v, scale=0.3))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_bool_mask(isa, rng, dtype):
    q, k, v = make_qkv(rng, 20, 33, 32, batch=(2,), hq=4, dtype=dtype)
    mask = rng.random((2, 1, 20, 33)) < 0.6
    mask[0, 0, 4] = False  # a fully-masked row: torch >= 2.5 also outputs 0
    ours = fusedattn.attention(q, k, v, mask=mask)
    assert np.all(ours[0, :, 4] == 0)
    assert_matches_torch(ours, sdpa(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_float_mask(isa, rng, dtype):
    q, k, v = make_qkv(rng, 20, 33, 32, batch=(2,), hq=4, dtype=dtype)
    mask = (rng.standard_normal((4, 20, 33)) * 2).astype(dtype)
    mask[rng.random(mask.shape) < 0.3] = -np.inf
    assert_matches_torch(fusedattn.attention(q, k, v, mask=mask), sdpa(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("lq,lk", [(24, 24), (16, 40), (40, 16)])
def test_is_causal_is_top_left(isa, rng, dtype, lq, lk):
    q, k, v = make_qkv(rng, lq, lk, 16, batch=(1,), hq=2, dtype=dtype)
    theirs = sdpa(q, k, v, is_causal=True)
    assert_matches_torch(fusedattn.attention(q, k, v, causal=True), theirs)
    assert_matches_torch(fusedattn.attention(q, k, v, causal="top_left"), theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_bottom_right_as_explicit_mask(isa, rng, dtype):
    # torch has no bottom-right is_causal; the equivalent boolean mask j <= i + Lk - Lq.
    q, k, v = make_qkv(rng, 9, 30, 16, batch=(1,), hq=2, dtype=dtype)
    mask = np.arange(30)[None, :] <= np.arange(9)[:, None] + 21
    assert_matches_torch(fusedattn.attention(q, k, v, causal="bottom_right"), sdpa(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (8, 1)])
def test_gqa(isa, rng, dtype, hq, hkv):
    q, k, v = make_qkv(rng, 19, 27, 32, batch=(2,), hq=hq, hkv=hkv, dtype=dtype)
    assert_matches_torch(fusedattn.attention(q, k, v), sdpa(q, k, v, enable_gqa=True))
    assert_matches_torch(fusedattn.attention(q, k, v, causal=True), sdpa(q, k, v, enable_gqa=True, is_causal=True))
    mask = rng.random((19, 27)) < 0.7
    assert_matches_torch(fusedattn.attention(q, k, v, mask=mask), sdpa(q, k, v, enable_gqa=True, attn_mask=mask))
