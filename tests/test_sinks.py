"""Issue #15 through the public API: attention sinks in every entry point, int8 K/V in attention(), the
backend table's refusals, each against the float64 reference (fusedattn.reference, which shares no code with
the kernels) on every ISA path.

Tolerances: float32 kernels vs the float64 reference, ``atol = rtol = 2e-5`` (conftest.tol: length-D dot
products and length-Lk weighted sums in float32, errors of a few 1e-7 for O(1) inputs; 40x headroom). A
sink is one more term of each row's denominator, so it adds one rounding per row: the same bound holds.
"""
from __future__ import annotations

import numpy as np
import pytest

import fusedattn as fa
from fusedattn import reference
from conftest import assert_close, make_qkv

VARIANTS = {
    "plain": {},
    "causal": {"causal": True},
    "bottom_right_window": {"causal": "bottom_right", "window": (5, None)},
    "alibi_softcap": {"alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625]), "softcap": 6.0},
    "dropout": {"dropout_p": 0.3, "seed": 11},
    "mask": {"mask": "random"},
}


def _kwargs(rng, name, lq, lk):
    kwargs = dict(VARIANTS[name])
    if kwargs.get("mask") == "random":
        kwargs["mask"] = rng.random((lq, lk)) < 0.7
    return kwargs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("lq, lk", [(1, 300), (3, 77), (37, 70)])  # decode layout, few rows, prefill
def test_sinks_match_the_reference(isa, rng, variant, lq, lk):
    q, k, v = make_qkv(rng, lq=lq, lk=lk, d=40, hq=4, hkv=2)
    sinks = rng.standard_normal(4).astype(np.float32) * 2
    kwargs = _kwargs(rng, variant, lq, lk)
    out, lse = fa.attention(q, k, v, sinks=sinks, return_lse=True, **kwargs)
    want, want_lse = reference.attention(q, k, v, sinks=sinks, return_lse=True, **kwargs)
    assert_close(out, want)
    assert_close(lse, want_lse)
    # The sink only ever lowers each row's weights: lse grows, by exactly logaddexp.
    _, plain_lse = fa.attention(q, k, v, return_lse=True, **kwargs)
    assert_close(lse, np.logaddexp(plain_lse, sinks[:, None]).astype(np.float32))


def test_rows_that_see_no_key_give_zero_and_the_sink(isa, rng):
    q, k, v = make_qkv(rng, lq=6, lk=4, d=8, hq=2)
    sinks = np.array([1.5, -2.0], np.float32)
    out, lse = fa.attention(q, k, v, sinks=sinks, causal="bottom_right", return_lse=True)  # rows 0, 1 see nothing
    np.testing.assert_array_equal(out[..., :2, :], 0)
    np.testing.assert_array_equal(lse[..., :2], np.broadcast_to(sinks[:, None], lse[..., :2].shape))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_gives_dsinks(isa, rng, dtype):
    q, k, v = make_qkv(rng, lq=9, lk=13, d=16, hq=4, hkv=2, dtype=dtype)
    sinks = rng.standard_normal(4).astype(dtype)
    out, lse = fa.attention(q, k, v, sinks=sinks, causal=True, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(dtype)
    got = fa.attention_backward(dout, q, k, v, out, lse, sinks=sinks, causal=True)
    want = reference.attention_backward(dout, q, k, v, out, lse, sinks=sinks, causal=True)
    assert len(got) == 4 and got[3].shape == (4,) and got[3].dtype == dtype
    for g, w in zip(got, want):
        assert_close(g, w)
    # dsinks by central differences of sum(dout * out) in float64 (h = 1e-6: truncation ~h^2, rounding ~1e-10).
    if dtype == np.float64:
        h = 1e-6
        for head in range(4):
            bumped = [sinks.copy(), sinks.copy()]
            bumped[0][head] += h
            bumped[1][head] -= h
            plus, minus = (np.sum(dout * fa.attention(q, k, v, sinks=s, causal=True)) for s in bumped)
            np.testing.assert_allclose(got[3][head], (plus - minus) / (2 * h), rtol=1e-6, atol=1e-8)


def test_vjp_carries_sinks(rng):
    q, k, v = make_qkv(rng, lq=5, lk=8, d=8, hq=2)
    sinks = np.array([0.3, -0.7], np.float32)
    out, backward = fa.attention_vjp(q, k, v, sinks=sinks)
    assert len(backward(np.ones_like(out))) == 4


def test_varlen_with_sinks_is_per_sequence_attention(isa, rng):
    lens = [3, 0, 7, 1]
    cu = np.concatenate([[0], np.cumsum(lens)])
    q = rng.standard_normal((cu[-1], 4, 16), dtype=np.float32)
    k = rng.standard_normal((cu[-1], 2, 16), dtype=np.float32)
    v = rng.standard_normal((cu[-1], 2, 16), dtype=np.float32)
    sinks = rng.standard_normal(4).astype(np.float32)
    out, lse = fa.attention_varlen(q, k, v, cu, cu, causal=True, sinks=sinks, return_lse=True)
    for b in range(len(lens)):
        rows = slice(cu[b], cu[b + 1])
        want, want_lse = reference.attention(*(x[rows].swapaxes(0, 1)[None] for x in (q, k, v)), causal=True,
                                             sinks=sinks, return_lse=True)
        assert_close(out[rows], want[0].swapaxes(0, 1))
        assert_close(lse[:, rows], want_lse[0])
    grads = fa.attention_varlen_backward(np.ones_like(out), q, k, v, out, lse, cu, cu, causal=True, sinks=sinks)
    want = reference.attention_varlen_backward(np.ones_like(out), q, k, v, out, lse, cu, cu, causal=True, sinks=sinks)
    for g, w in zip(grads, want, strict=True):
        assert_close(g, w)


def test_weights_with_sinks_sum_to_one_minus_the_sink(isa, rng):
    q, k, _ = make_qkv(rng, lq=7, lk=9, d=8, hq=2)
    sinks = np.array([0.5, 2.0], np.float32)
    w = fa.attention_weights(q, k, sinks=sinks, causal=True)
    assert_close(w, reference.attention_weights(q, k, sinks=sinks, causal=True))
    _, lse = fa.attention(q, k, k, sinks=sinks, causal=True, return_lse=True)
    assert_close(w.sum(-1), 1 - np.exp(sinks[:, None] - lse))


def test_merge_counts_the_sink_once(rng):
    q, k, v = make_qkv(rng, lq=4, lk=50, d=16, hq=2)
    sinks = np.array([1.0, -1.0], np.float32)
    parts = [fa.attention(q, k[..., s, :], v[..., s, :], return_lse=True) for s in (slice(0, 20), slice(20, 50))]
    out, lse = fa.merge_attention([o for o, _ in parts], [l for _, l in parts], sinks=sinks)
    want, want_lse = fa.attention(q, k, v, sinks=sinks, return_lse=True)
    assert_close(out, want)
    assert_close(lse, want_lse)
    with pytest.raises(ValueError, match=r"sinks must have shape \(Hq,\) = \(2,\)"):
        fa.merge_attention([o for o, _ in parts], [l for _, l in parts], sinks=np.zeros(3))


def test_kv_cache_and_layer_pass_sinks(rng):
    cache = fa.KVCache(1, 2, max_len=8, head_dim=8)
    k, v = (rng.standard_normal((1, 2, 5, 8), dtype=np.float32) for _ in "kv")
    cache.append(k, v)
    q = rng.standard_normal((1, 4, 1, 8), dtype=np.float32)
    sinks = rng.standard_normal(4).astype(np.float32)
    assert_close(cache.attend(q, sinks=sinks), reference.attention(q, k, v, sinks=sinks, causal="bottom_right"))


# --- int8 K/V through attention() ------------------------------------------------------------------

@pytest.mark.parametrize("lq", [1, 7, 40])
def test_int8_kv_matches_the_reference_on_the_dequantised_values(isa, rng, lq):
    q, k, v = make_qkv(rng, lq=lq, lk=90, d=40, hq=8, hkv=2)
    (k8, ks), (v8, vs) = fa.quantize_kv(k), fa.quantize_kv(v)
    k8, ks = k8[..., ::-1, :], ks[..., ::-1]  # non-contiguous int8 and scales, read through their strides
    out = fa.attention(q, k8, v8, k_scale=ks, v_scale=vs, causal="bottom_right")
    deq_k, deq_v = k8.astype(np.float64) * ks[..., None], v8.astype(np.float64) * vs[..., None]
    assert_close(out, reference.attention(q.astype(np.float64), deq_k, deq_v, causal="bottom_right").astype(np.float32))


def test_int8_validation_names_the_argument(rng):
    q, k, v = make_qkv(rng, lq=2, lk=6, d=8)
    (k8, ks), (v8, vs) = fa.quantize_kv(k), fa.quantize_kv(v)
    with pytest.raises(ValueError, match="int8 k and v need their per-token scales"):
        fa.attention(q, k8, v8)
    with pytest.raises(ValueError, match="k_scale / v_scale are for int8 k and v"):
        fa.attention(q, k, v, k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match="k_scale and v_scale must be given together"):
        fa.attention(q, k8, v8, k_scale=ks)
    with pytest.raises(ValueError, match=r"k_scale must have shape \(2, 4, 6\)"):
        fa.attention(q, k8, v8, k_scale=ks[..., :5], v_scale=vs)
    with pytest.raises(TypeError, match=r"q must have dtype float32, float64, float16 or bfloat16 \(ml_dtypes\), got int32"):
        fa.attention(q.astype(np.int32), k8, v8, k_scale=ks, v_scale=vs)
    with pytest.raises(TypeError, match="k and v must both be int8"):
        fa.attention(q, k8, v, k_scale=ks, v_scale=vs)


@pytest.mark.parametrize("bad, error, message", [
    (np.zeros(3), ValueError, r"sinks must have shape \(Hq,\) = \(4,\)"),
    (np.array([0, np.nan, 0, 0]), ValueError, "sinks must be finite"),
    (np.array(["a"] * 4), TypeError, "sinks must be a real-valued array"),
])
def test_bad_sinks_are_refused(rng, bad, error, message):
    q, k, v = make_qkv(rng, lq=2, lk=6, d=8)
    with pytest.raises(error, match=message):
        fa.attention(q, k, v, sinks=bad)


# --- the backend table ----------------------------------------------------------------------------------

@pytest.mark.parametrize("option, name", [("sinks", "sinks"), ("int8", "int8")])
def test_the_gpu_refuses_sinks_and_int8_listing_every_backend(rng, option, name):
    q, k, v = make_qkv(rng, lq=2, lk=6, d=8)
    kwargs = {"sinks": np.zeros(4, np.float32)} if option == "sinks" else {}
    if option == "int8":
        (k, kwargs["k_scale"]), (v, kwargs["v_scale"]) = fa.quantize_kv(k), fa.quantize_kv(v)
    with pytest.raises(NotImplementedError, match=name) as error:
        fa.attention(q, k, v, device="cuda", **kwargs)
    message = str(error.value)
    assert "no backend can run this attention() call" in message
    for backend in ("cuda:", "cpu:", "reference:"):
        assert backend in message


def test_every_public_function_goes_through_the_table(rng, monkeypatch):
    """Taking the compiled backend away routes every entry point to the reference, validated first."""
    from fusedattn import _backend

    q, k, v = make_qkv(rng, lq=3, lk=5, d=8)
    out, lse = fa.attention(q, k, v, return_lse=True)
    monkeypatch.setattr(_backend, "_core", None)
    assert_close(fa.attention(q, k, v), out)
    assert len(fa.attention_backward(np.ones_like(out), q, k, v, out, lse)) == 3
    with pytest.raises(ValueError, match="window must be a pair"):  # the API's words, not the reference's
        fa.attention(q, k, v, window=3)
