"""MultiHeadAttention.backward and AdditiveAttention.backward (issue 5: training through the layers).

Judged against:

* central finite differences of the layers' own float64 forward, for every element of every
  parameter and every input, on small layers (the definition of a gradient: independent of any
  backward formula, and it covers grouped-query attention, which torch's module lacks);
* ``torch.autograd`` through ``torch.nn.MultiheadAttention`` loaded with the same state dict, in
  float32 and float64: input and parameter gradients, both ``batch_first`` layouts, bool masks in
  torch's convention, causal;

plus the backward's contract: the return form (``dx`` vs ``(dquery, dkey, dvalue)``), ``grads``'
keys/shapes/dtypes, layouts, and its errors.

Errors are measured relative to the largest magnitude of the expected tensor (:func:`relative_error`),
as in test_backward.py: gradients are sums of terms of both signs, so single elements can be far
smaller than the rounding of the terms that produced them, and an element-wise rtol would demand
more than any float implementation (torch included) can deliver.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import randn
from fusedattn.layers import AdditiveAttention, MultiHeadAttention


def relative_error(got, want, floor=1.0):
    """``max|got - want| / max(max|want|, floor)`` in float64.

    The floor (inputs and dout are O(1), so are natural gradient magnitudes) keeps an identically
    vanishing gradient (e.g. the query path of a key nobody may see) from turning noise into huge ratios.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), floor))


def assert_grads_close(got: dict, want: dict, tol, dtype=None):
    """Same names, shapes (and dtype), all finite, each within ``tol`` (relative_error)."""
    assert list(got) == list(want), (list(got), list(want))
    for name in want:
        g = got[name]
        assert isinstance(g, np.ndarray) and g.shape == np.shape(want[name]), name
        if dtype is not None:
            assert g.dtype == dtype, f"{name}: dtype {g.dtype}"
        assert np.isfinite(g).all(), f"{name}: non-finite gradient"
        err = relative_error(g, want[name])
        assert err <= tol, f"{name}: error {err:.3g} x max|expected| exceeds {tol:.1g}"


def nonzero_biases(layer, rng):
    """torch-style layers start with zero biases; random ones make a bias bug visible."""
    sd = layer.state_dict()
    for name in sd:
        if "bias" in name:
            sd[name] = randn(rng, sd[name].shape, layer.dtype) * 0.5
    layer.load_state_dict(sd)


def mask_with_dead_row(rng, shape):
    """Bool mask (True = may attend) with row 1 fully masked (out = bias, no attention gradient)."""
    mask = rng.random(shape) < 0.7
    mask[..., 0] = True
    mask[..., 1, :] = False
    return mask


# ---------------------------------------------------------------------------------------------
# Finite differences (float64)
# ---------------------------------------------------------------------------------------------

# Central differences with a relative step h = FD_STEP * max(1, |x|). Error = truncation h^2/6 * |L'''|
# (~1e-13 for these O(1) inputs and weights) + rounding of the two loss evaluations amplified by 1/h:
# the loss sum(out * R) adds ~100 terms of size ~1, each carrying ~eps64 = 1.1e-16 relative error, so
# ~1e-16 * (10..100) / 1e-6 ~ 1e-9 .. 1e-8. Measured: at most 1.4e-9 relative to max(max|grad|, 1).
# FD_TOL = 5e-8 keeps ~35x headroom, while a real error (a transposed weight, a missing bias row, a
# wrong head split, a dropped q/k/v path) is >= 1e-2.
FD_STEP = 1e-6
FD_TOL = 5e-8


def numeric_gradients(loss, arrays: dict) -> dict:
    """Central differences of ``loss()`` for every element of each array (perturbed in place)."""
    grads = {}
    for name, a in arrays.items():
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            saved = a[idx]
            h = FD_STEP * max(1.0, abs(saved))
            a[idx] = saved + h
            plus = loss()
            a[idx] = saved - h
            minus = loss()
            a[idx] = saved
            g[idx] = (plus - minus) / (2 * h)
        grads[name] = g
    return grads


def check_layer_against_fd(layer, rng, inputs: dict, call, backward_to_inputs):
    """FD check of ``layer.backward`` for the call ``call(layer, **inputs) -> out``.

    ``backward_to_inputs(result)`` maps backward's return value to ``{input name: gradient}`` (the
    names of ``inputs``). The loss is ``sum(out * R)`` for a random R, so ``dout = R``.
    """
    params = layer.state_dict()  # copies: perturbed in place, loaded before each evaluation
    out = call(layer, **inputs)
    r = randn(rng, out.shape, np.float64)
    got = backward_to_inputs(layer.backward(r))
    got.update(layer.grads)

    def loss():
        layer.load_state_dict(params)
        return float(np.sum(call(layer, **inputs) * r))

    want = numeric_gradients(loss, {**inputs, **params})
    assert_grads_close(got, want, FD_TOL, dtype=np.float64)


def _self_call(**kw):
    return lambda layer, x: layer(x, **kw)[0]


def _cross_call(**kw):
    return lambda layer, query, key, value: layer(query, key, value, **kw)[0]


def _shared_kv_call(**kw):
    return lambda layer, query, memory: layer(query, memory, **kw)[0]


def _as_self(g):
    return {"x": g}


def _as_cross(g):
    return dict(zip(("query", "key", "value"), g))


def _as_shared_kv(g):
    # key and value are one array: its gradient is the sum of the two paths (backward's contract).
    return {"query": g[0], "memory": g[1] + g[2]}


def _mha_fd_cases():
    """id -> (layer kwargs, inputs builder(rng), call, map of backward's result)."""
    return {
        # Self-attention via the stacked in_proj_weight, grouped-query heads, causal.
        "self_gqa_causal": (dict(embed_dim=8, num_heads=4, num_kv_heads=2),
                            lambda rng: {"x": randn(rng, (2, 5, 8), np.float64)},
                            _self_call(causal=True), _as_self),
        # (L, B, E) layout, a per-(batch, head) bool mask with a query row that may attend nothing.
        "self_seq_first_dead_row": (dict(embed_dim=8, num_heads=2, batch_first=False),
                                    lambda rng: {"x": randn(rng, (5, 2, 8), np.float64)},
                                    _self_call(mask=mask_with_dead_row(np.random.default_rng(1), (2, 2, 5, 5))),
                                    _as_self),
        # mha(query, memory): one array as key and value; float mask with -inf, bottom-right causal.
        "shared_kv_seq_first_float_mask": (
            dict(embed_dim=8, num_heads=2, batch_first=False),
            lambda rng: {"query": randn(rng, (4, 2, 8), np.float64), "memory": randn(rng, (6, 2, 8), np.float64)},
            _shared_kv_call(mask=np.where(np.random.default_rng(2).random((2, 4, 6)) < 0.2, -np.inf,
                                          np.random.default_rng(3).standard_normal((2, 4, 6))),
                            causal="bottom_right"),
            _as_shared_kv),
        # Separate projections (kdim, vdim != E), no biases, a key-padding mask (B, 1, 1, Lk).
        "kdim_vdim_no_bias_key_padding": (
            dict(embed_dim=8, num_heads=2, kdim=5, vdim=3, bias=False),
            lambda rng: {"query": randn(rng, (2, 3, 8), np.float64), "key": randn(rng, (2, 6, 5), np.float64),
                         "value": randn(rng, (2, 6, 3), np.float64)},
            _cross_call(mask=np.arange(6)[None, None, None, :] < np.array([4, 6])[:, None, None, None]),
            _as_cross),
        # Unbatched (L, E) inputs, multi-query attention (one kv head), distinct key and value arrays.
        "unbatched_mqa_causal": (
            dict(embed_dim=8, num_heads=4, num_kv_heads=1),
            lambda rng: {"query": randn(rng, (4, 8), np.float64), "key": randn(rng, (5, 8), np.float64),
                         "value": randn(rng, (5, 8), np.float64)},
            _cross_call(causal=True), _as_cross),
        # mha(x, x, x) takes the stacked one-matmul path but returns the three paths separately.
        "self_explicit_xxx": (dict(embed_dim=8, num_heads=2),
                              lambda rng: {"x": randn(rng, (2, 4, 8), np.float64)},
                              lambda layer, x: layer(x, x, x)[0], lambda g: {"x": g[0] + g[1] + g[2]}),
    }


MHA_FD_CASES = _mha_fd_cases()


@pytest.mark.parametrize("case", list(MHA_FD_CASES))
def test_mha_backward_matches_finite_differences(isa, rng, case):
    layer_kwargs, make_inputs, call, to_inputs = MHA_FD_CASES[case]
    mha = MultiHeadAttention(**layer_kwargs, dtype=np.float64, rng=rng)
    nonzero_biases(mha, rng)
    check_layer_against_fd(mha, rng, make_inputs(rng), call, to_inputs)


ADDITIVE_FD_CASES = {
    "self_unbatched_causal": (dict(units=6),
                              lambda rng: {"x": randn(rng, (5, 4), np.float64)},
                              _self_call(causal=True), _as_self),
    "cross_dead_row": (dict(units=5),
                       lambda rng: {"query": randn(rng, (2, 4, 3), np.float64), "key": randn(rng, (2, 6, 4), np.float64),
                                    "value": randn(rng, (2, 6, 2), np.float64)},
                       _cross_call(mask=mask_with_dead_row(np.random.default_rng(4), (2, 4, 6))), _as_cross),
    "shared_kv_float_mask": (dict(units=4),
                             lambda rng: {"query": randn(rng, (2, 3, 5), np.float64),
                                          "memory": randn(rng, (2, 5, 3), np.float64)},
                             _shared_kv_call(mask=np.where(np.random.default_rng(5).random((3, 5)) < 0.2, -np.inf,
                                                           np.random.default_rng(6).standard_normal((3, 5)))),
                             _as_shared_kv),
}


@pytest.mark.parametrize("case", list(ADDITIVE_FD_CASES))
def test_additive_backward_matches_finite_differences(isa, rng, case):
    layer_kwargs, make_inputs, call, to_inputs = ADDITIVE_FD_CASES[case]
    inputs = make_inputs(rng)
    att = AdditiveAttention(**layer_kwargs, dtype=np.float64, rng=rng)
    call(att, **inputs)  # builds the lazily sized parameters before the FD loop snapshots them
    check_layer_against_fd(att, rng, inputs, call, to_inputs)


# ---------------------------------------------------------------------------------------------
# Against torch.autograd through torch.nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------

# Both sides round independently. float64: measured <= 5e-16 of max|grad|; 1e-12 (the kernel tests'
# float64 tolerance) leaves ~2000x. float32: parameter gradients are sums over all B * L rows (<= 27
# here) of products of O(1) values, on top of the attention backward's own ~1e-6 (test_backward.py);
# measured <= 5e-7 of max|grad| against torch (2.3e-7 against the float64 layer). 5e-6 keeps ~10x
# headroom; a transposed weight, swapped q/k/v row block or mask-convention slip moves gradients by
# >= 1e-2 of their maximum.
TORCH_TOL = {np.dtype(np.float32): 5e-6, np.dtype(np.float64): 1e-12}

# id, embed_dim, heads, kdim, vdim, batch_first, Lq, Lk (None: self-attention), Lk input form, mask, causal, bias
TORCH_CASES = [
    ("self", 16, 4, None, None, True, 7, None, "self", None, False, True),
    ("self_seq_first_causal", 16, 2, None, None, False, 6, None, "self", None, True, True),
    ("shared_kv_attn_bool", 16, 4, None, None, True, 5, 9, "shared", "attn_bool", False, True),
    ("cross_seq_first_key_padding", 16, 2, None, None, False, 6, 4, "distinct", "key_padding", False, True),
    ("kdim_vdim_causal_key_padding", 16, 4, 6, 10, True, 5, 8, "distinct", "key_padding", True, True),
    ("self_bool_mask_causal_no_bias", 8, 2, None, None, False, 5, None, "self", "attn_bool", True, False),
]


def _torch_masks(kind, rng, b, lq, lk, causal):
    """(torch kwargs, fusedattn mask): the same constraint in each library's bool convention."""
    kwargs, mask = {}, None
    if kind == "key_padding":
        pad = rng.random((b, lk)) < 0.3            # torch: True = padding = NOT allowed
        pad[:, 0] = False                          # every row keeps a key: torch gives NaN rows otherwise
        kwargs["key_padding_mask"], mask = pad, ~pad[:, None, None, :]
    elif kind == "attn_bool":
        forbid = rng.random((lq, lk)) < 0.3        # torch attn_mask bool: True = NOT allowed
        forbid[:, 0] = False
        kwargs["attn_mask"], mask = forbid, ~forbid
    if causal:
        # torch's is_causal is only a hint that attn_mask *is* the causal mask: give both, combined.
        kwargs["attn_mask"] = np.triu(np.ones((lq, lk), bool), 1) | kwargs.get("attn_mask", False)
        kwargs["is_causal"] = kind is None
    return kwargs, mask


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is needed to compare with torch.nn.MultiheadAttention")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_mha_backward_matches_torch(torch, rng, case, dtype):
    _, e, h, kdim, vdim, batch_first, lq, lk, form, mask_kind, causal, bias = case
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    torch.manual_seed(int(rng.integers(1 << 31)))
    ref = torch.nn.MultiheadAttention(e, h, kdim=kdim, vdim=vdim, bias=bias, batch_first=batch_first, dtype=tdtype)
    mha = MultiHeadAttention(e, h, kdim=kdim, vdim=vdim, bias=bias, batch_first=batch_first, dtype=dtype)
    nonzero_biases(mha, rng)
    ref.load_state_dict({name: torch.from_numpy(p) for name, p in mha.state_dict().items()})

    b = 3
    lk = lq if lk is None else lk

    def layout(length, feat):
        return (b, length, feat) if batch_first else (length, b, feat)

    query = randn(rng, layout(lq, e), dtype)
    arrays = {"query": query}
    if form == "shared":
        arrays["memory"] = randn(rng, layout(lk, e), dtype)
    elif form == "distinct":
        arrays["key"], arrays["value"] = randn(rng, layout(lk, kdim or e), dtype), randn(rng, layout(lk, vdim or e), dtype)
    torch_kwargs, mask = _torch_masks(mask_kind, rng, b, lq, lk, causal)

    leaves = {name: torch.from_numpy(x).requires_grad_(True) for name, x in arrays.items()}
    t_args = {"self": lambda: (leaves["query"],) * 3, "shared": lambda: (leaves["query"],) + (leaves["memory"],) * 2,
              "distinct": lambda: (leaves["query"], leaves["key"], leaves["value"])}[form]()
    t_out, _ = ref(*t_args, need_weights=False,
                   **{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in torch_kwargs.items()})
    dout = randn(rng, tuple(t_out.shape), dtype)
    t_out.backward(torch.from_numpy(dout))

    if form == "self":
        out, _ = mha(query, mask=mask, causal=causal)
        got = {"query": mha.backward(dout)}
    elif form == "shared":
        out, _ = mha(query, arrays["memory"], mask=mask, causal=causal)
        dq, dk, dv = mha.backward(dout)
        got = {"query": dq, "memory": dk + dv}
    else:
        out, _ = mha(query, arrays["key"], arrays["value"], mask=mask, causal=causal)
        got = dict(zip(("query", "key", "value"), mha.backward(dout)))
    tol = TORCH_TOL[np.dtype(dtype)]
    assert relative_error(out, t_out.detach().numpy()) <= tol
    got.update(mha.grads)
    want = {name: t.grad.numpy() for name, t in leaves.items()}
    want.update({name: p.grad.numpy() for name, p in ref.named_parameters()})
    assert_grads_close(got, want, tol, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The backward's contract
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(), dict(kdim=5, vdim=3), dict(bias=False), dict(num_kv_heads=1, kdim=4)],
                         ids=["stacked", "separate", "no_bias", "mqa_separate"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_mha_grads_mirror_state_dict(rng, kwargs, dtype):
    mha = MultiHeadAttention(8, 2, dtype=dtype, rng=rng, **kwargs)
    assert mha.grads is None
    query = randn(rng, (2, 3, 8), dtype)
    key, value = randn(rng, (2, 4, mha.kdim), dtype), randn(rng, (2, 4, mha.vdim), dtype)
    out, _ = mha(query, key, value)
    dq, dk, dv = mha.backward(np.ones_like(out))
    sd = mha.state_dict()
    assert list(mha.grads) == list(sd)  # same keys, same (torch's) order
    for name, g in mha.grads.items():
        assert g.shape == sd[name].shape and g.dtype == dtype, name
    for g, x in ((dq, query), (dk, key), (dv, value)):
        assert g.shape == x.shape and g.dtype == dtype


def test_mha_self_attention_forms(rng):
    """mha(x) returns one dx; mha(x, x, x) the three paths, which sum to it; mha(x, kv) returns three."""
    mha = MultiHeadAttention(8, 2, num_kv_heads=1, dtype=np.float64, rng=rng)
    nonzero_biases(mha, rng)
    x = randn(rng, (2, 5, 8), np.float64)
    out, _ = mha(x, causal=True)
    r = randn(rng, out.shape, np.float64)
    dx = mha.backward(r)
    grads = mha.grads
    assert isinstance(dx, np.ndarray) and dx.shape == x.shape
    mha(x, x, x, causal=True)
    paths = mha.backward(r)
    assert isinstance(paths, tuple) and len(paths) == 3
    np.testing.assert_allclose(paths[0] + paths[1] + paths[2], dx, rtol=1e-12, atol=1e-12)
    for name, g in mha.grads.items():  # the parameters see the same computation either way
        np.testing.assert_allclose(g, grads[name], rtol=1e-12, atol=1e-12)
    mha(x, x)  # value defaults to key: still three arrays
    assert len(mha.backward(r)) == 3


def test_mha_backward_layouts_agree(rng):
    """batch_first, seq-first and unbatched calls give the same gradients (up to BLAS blocking)."""
    a = MultiHeadAttention(8, 4, num_kv_heads=2, dtype=np.float64, rng=3)
    b = MultiHeadAttention(8, 4, num_kv_heads=2, batch_first=False, dtype=np.float64, rng=3)
    q, kv = randn(rng, (2, 5, 8), np.float64), randn(rng, (2, 7, 8), np.float64)
    r = randn(rng, (2, 5, 8), np.float64)
    a(q, kv, causal="bottom_right")
    ga = a.backward(r)
    b(q.swapaxes(0, 1), kv.swapaxes(0, 1), causal="bottom_right")
    gb = b.backward(r.swapaxes(0, 1))
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x, y.swapaxes(0, 1), rtol=1e-12, atol=1e-12)
    for name in a.grads:
        np.testing.assert_allclose(a.grads[name], b.grads[name], rtol=1e-12, atol=1e-12)
    # Unbatched: the gradients of one sequence alone; the parameter gradients sum over the batch.
    total = {name: np.zeros_like(g) for name, g in a.grads.items()}
    for i in range(2):
        a(q[i], kv[i], causal="bottom_right")
        gi = a.backward(r[i])
        for x, y in zip(gi, ga):
            np.testing.assert_allclose(x, y[i], rtol=1e-12, atol=1e-12)
        for name, g in a.grads.items():
            total[name] += g
    for name in total:
        np.testing.assert_allclose(total[name], b.grads[name], rtol=1e-12, atol=1e-12)


def test_mha_float32_grads_match_float64(isa, rng):
    """float32 layers (grouped-query: no torch equivalent) against the same layer in float64."""
    m64 = MultiHeadAttention(16, 4, num_kv_heads=2, dtype=np.float64, rng=rng)
    nonzero_biases(m64, rng)
    m32 = MultiHeadAttention(16, 4, num_kv_heads=2, dtype=np.float32)
    m32.load_state_dict(m64.state_dict())
    x, r = randn(rng, (3, 9, 16), np.float32), randn(rng, (3, 9, 16), np.float32)
    m32(x, causal=True)
    m64(x, causal=True)
    got = {"x": m32.backward(r), **m32.grads}
    want = {"x": m64.backward(r), **m64.grads}
    assert_grads_close(got, want, TORCH_TOL[np.dtype(np.float32)], dtype=np.float32)


@pytest.mark.parametrize("make", [lambda: MultiHeadAttention(8, 2, rng=0), lambda: AdditiveAttention(4, rng=0)],
                         ids=["mha", "additive"])
def test_need_weights_does_not_change_gradients(rng, make):
    layer = make()
    x = randn(rng, (2, 5, 8), np.float32)
    out, _ = layer(x, causal=True)
    r = randn(rng, out.shape, np.float32)
    dx, grads = layer.backward(r), layer.grads
    _, weights = layer(x, causal=True, need_weights=True)
    assert weights is not None
    np.testing.assert_array_equal(layer.backward(r), dx)  # the same computation, bit for bit
    for name, g in grads.items():
        np.testing.assert_array_equal(layer.grads[name], g)


def test_backward_can_repeat_and_is_linear_in_dout(rng):
    mha = MultiHeadAttention(8, 2, dtype=np.float64, rng=rng)
    x = randn(rng, (2, 4, 8), np.float64)
    out, _ = mha(x)
    r = randn(rng, out.shape, np.float64)
    dx = mha.backward(r)
    np.testing.assert_array_equal(mha.backward(r), dx)  # the cache is not consumed
    np.testing.assert_allclose(mha.backward(2.5 * r), 2.5 * dx, rtol=1e-12, atol=1e-12)
    assert mha.backward(r.astype(np.float32)).dtype == np.float64  # dout is cast to the layer's dtype


def test_additive_backward_forms_and_grads(rng):
    att = AdditiveAttention(6, query_dim=5, key_dim=4, dtype=np.float32, rng=rng)
    assert att.grads is None
    q, k, v = randn(rng, (2, 3, 5), np.float32), randn(rng, (2, 7, 4), np.float32), randn(rng, (2, 7, 9), np.float32)
    out, _ = att(q, k, v)
    dq, dk, dv = att.backward(np.ones_like(out))
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert all(g.dtype == np.float32 for g in (dq, dk, dv))
    assert {n: (g.shape, g.dtype) for n, g in att.grads.items()} == {
        n: (p.shape, p.dtype) for n, p in att.state_dict().items()}
    # The value enters linearly through softmax weights that sum to 1: d sum(out) / dv sums to 1 per batch.
    np.testing.assert_allclose(dv.sum(axis=1), np.full((2, 9), 3.0), rtol=1e-5)
    sq = AdditiveAttention(6, query_dim=4, key_dim=4, dtype=np.float64, rng=1)
    x = randn(rng, (6, 4), np.float64)
    sq(x)
    dx = sq.backward(np.ones((6, 4)))
    assert isinstance(dx, np.ndarray) and dx.shape == x.shape


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

LAYERS = [(lambda: MultiHeadAttention(8, 2, rng=0), "MultiHeadAttention"),
          (lambda: AdditiveAttention(4, query_dim=8, key_dim=8, rng=0), "AdditiveAttention")]


@pytest.mark.parametrize("make,name", LAYERS, ids=["mha", "additive"])
def test_backward_needs_a_forward_call(make, name):
    layer = make()
    x = np.ones((2, 3, 8), np.float32)
    with pytest.raises(RuntimeError, match=rf"{name}\.backward\(\) needs a forward call first"):
        layer.backward(np.ones_like(x))
    out, _ = layer(x)
    layer.backward(np.ones_like(out))
    # New parameters make the cached activations stale: a new forward call is required.
    layer.load_state_dict(layer.state_dict())
    with pytest.raises(RuntimeError, match=r"needs a forward call first"):
        layer.backward(np.ones_like(out))
    # So does a failed call (its arguments were rejected), rather than differentiating an older one.
    layer(x)
    with pytest.raises(ValueError):
        layer(np.ones((2, 3, 7), np.float32))
    with pytest.raises(RuntimeError, match=r"needs a forward call first"):
        layer.backward(np.ones_like(out))


def test_additive_backward_before_build():
    with pytest.raises(RuntimeError, match=r"AdditiveAttention\.backward\(\) needs a forward call first"):
        AdditiveAttention(4).backward(np.ones((2, 3, 8)))


@pytest.mark.parametrize("make,name", LAYERS, ids=["mha", "additive"])
def test_backward_dout_errors(make, name):
    layer = make()
    out, _ = layer(np.ones((2, 3, 8), np.float32))
    with pytest.raises(ValueError, match=r"dout must have the shape of the forward call's output \(2, 3, 8\), "
                                         r"got \(3, 2, 8\)"):
        layer.backward(np.ones((3, 2, 8), np.float32))
    with pytest.raises(TypeError, match=r"dout must be a floating-point array.*int64"):
        layer.backward(np.ones(out.shape, np.int64))


# ---------------------------------------------------------------------------------------------
# Learned attention sinks (issue #15): dsinks with the other gradients, by finite differences
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["self_gqa_causal", "self_seq_first_dead_row", "unbatched_mqa_causal"])
def test_mha_sinks_backward_matches_finite_differences(rng, case):
    layer_kwargs, make_inputs, call, to_inputs = MHA_FD_CASES[case]
    sinks = randn(rng, (layer_kwargs["num_heads"],), np.float64)  # away from 0: a sign error would show
    mha = MultiHeadAttention(**layer_kwargs, dtype=np.float64, rng=rng, sinks=sinks)
    nonzero_biases(mha, rng)
    check_layer_against_fd(mha, rng, make_inputs(rng), call, to_inputs)
    assert "sinks" in mha.grads and mha.grads["sinks"].shape == (layer_kwargs["num_heads"],)
