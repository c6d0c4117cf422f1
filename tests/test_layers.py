"""MultiHeadAttention against torch.nn.MultiheadAttention and a NumPy re-implementation; AdditiveAttention
against the Bahdanau formula in float64 NumPy.

Tolerances: the layers add projections (NumPy matmuls) around the kernel, each output a sum of at
most E = 32 products of O(1) numbers, so their rounding is of the kernel's own order:
float64 ``atol = rtol = 1e-12`` (errors measured ~5e-16 against torch and NumPy: ~1000x headroom);
float32 ``atol = rtol = 2e-5`` (conftest's kernel tolerance; measured ~1e-6 against torch, whose
float32 projections and softmax round differently). A wrong head split, transposed weight or
mask convention moves outputs by >= 1e-2.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import fusedattn
from conftest import tol
from fusedattn.layers import AdditiveAttention, MultiHeadAttention

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]


def randn(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def softmax_rows(s):
    """Masked softmax in float64, -inf scores weigh 0 and all--inf rows give 0 (fusedattn's rule)."""
    mx = s.max(-1, keepdims=True)
    dead = np.isneginf(mx)
    e = np.exp(s - np.where(dead, 0.0, mx))
    return e / np.where(dead, 1.0, e.sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# MultiHeadAttention vs torch
# ---------------------------------------------------------------------------------------------

# id, embed_dim, heads, kdim, vdim, batch_first, Lq, Lk (None: self-attention), mask kind, causal, bias
TORCH_CASES = [
    ("self", 32, 4, None, None, True, 7, None, None, False, True),
    ("self_seq_first_causal", 32, 4, None, None, False, 7, None, None, True, True),
    ("cross_key_padding", 32, 8, None, None, True, 5, 9, "key_padding", False, True),
    ("cross_seq_first_key_padding", 32, 2, None, None, False, 6, 4, "key_padding", False, True),
    ("kdim_vdim_key_padding", 32, 4, 12, 20, True, 5, 8, "key_padding", False, True),
    ("kdim_vdim_seq_first_float_mask", 24, 3, 10, 6, False, 4, 7, "float", False, True),
    ("self_causal_and_key_padding", 16, 2, None, None, True, 6, None, "key_padding", True, True),
    ("no_bias_cross", 16, 4, None, None, True, 3, 5, "attn_bool", False, False),
]


def _torch_masks(kind, rng, b, lq, lk):
    """(torch kwargs, fusedattn mask) expressing the same constraint in each library's convention."""
    if kind is None:
        return {}, None
    if kind == "key_padding":
        pad = rng.random((b, lk)) < 0.3            # torch: True = padding = NOT allowed
        pad[:, 0] = False                          # every row keeps one key (torch < 2.5 gives NaN otherwise)
        return {"key_padding_mask": pad}, ~pad[:, None, None, :]
    if kind == "attn_bool":
        forbid = rng.random((lq, lk)) < 0.3        # torch attn_mask bool: True = NOT allowed
        forbid[:, 0] = False
        return {"attn_mask": forbid}, ~forbid
    if kind == "float":
        add = rng.standard_normal((lq, lk))        # float masks are added in both libraries
        return {"attn_mask": add}, add
    raise AssertionError(kind)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_mha_matches_torch(isa, rng, case, dtype):
    torch = pytest.importorskip("torch", reason="torch is needed to compare with nn.MultiheadAttention")
    _, e, h, kdim, vdim, batch_first, lq, lk, mask_kind, causal, bias = case
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    torch.manual_seed(int(rng.integers(1 << 31)))
    ref = torch.nn.MultiheadAttention(e, h, kdim=kdim, vdim=vdim, bias=bias, batch_first=batch_first, dtype=tdtype).eval()
    # Make the biases non-zero (torch initialises them to 0), so that a bias bug would show.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.copy_(torch.randn(p.shape, dtype=tdtype) * 0.5)
    mha = MultiHeadAttention(e, h, kdim=kdim, vdim=vdim, bias=bias, batch_first=batch_first, dtype=dtype)
    mha.load_state_dict(ref.state_dict())

    b = 3
    self_attention = lk is None
    lk = lq if self_attention else lk

    def layout(length, feat):
        return (b, length, feat) if batch_first else (length, b, feat)

    query = randn(rng, layout(lq, e), dtype)
    key = query if self_attention else randn(rng, layout(lk, kdim or e), dtype)
    value = query if self_attention else randn(rng, layout(lk, vdim or e), dtype)
    torch_kwargs, mask = _torch_masks(mask_kind, rng, b, lq, lk)
    if causal:
        # torch's is_causal is a hint that attn_mask *is* the causal mask: give both, combined.
        forbid = np.triu(np.ones((lq, lk), bool), 1)
        torch_kwargs["attn_mask"] = forbid | torch_kwargs.get("attn_mask", False)
        torch_kwargs["is_causal"] = mask_kind is None

    with torch.no_grad():
        t_args = {k: (torch.from_numpy(np.asarray(v, dtype) if v.dtype != bool else v) if isinstance(v, np.ndarray) else v)
                  for k, v in torch_kwargs.items()}
        t_out, t_weights = ref(*(torch.from_numpy(x) for x in (query, key, value)), need_weights=True, **t_args)
    if self_attention:
        out, weights = mha(query, mask=mask, causal=causal, need_weights=True)
    else:
        out, weights = mha(query, key, value, mask=mask, causal=causal, need_weights=True)

    assert out.dtype == dtype and out.shape == query.shape
    assert weights.dtype == dtype and weights.shape == (b, lq, lk)
    np.testing.assert_allclose(out, t_out.numpy(), **tol(dtype))
    np.testing.assert_allclose(weights, t_weights.numpy(), **tol(dtype))


def test_mha_unbatched_matches_torch(rng):
    torch = pytest.importorskip("torch", reason="torch is needed to compare with nn.MultiheadAttention")
    ref = torch.nn.MultiheadAttention(16, 4, dtype=torch.float64).eval()
    mha = MultiHeadAttention(16, 4, batch_first=False, dtype=np.float64)
    mha.load_state_dict(ref.state_dict())
    q, kv = randn(rng, (5, 16)), randn(rng, (8, 16))
    with torch.no_grad():
        t_out, t_w = ref(torch.from_numpy(q), torch.from_numpy(kv), torch.from_numpy(kv))
    out, w = mha(q, kv, need_weights=True)
    assert out.shape == (5, 16) and w.shape == (5, 8)
    np.testing.assert_allclose(out, t_out.numpy(), **tol(np.float64))
    np.testing.assert_allclose(w, t_w.numpy(), **tol(np.float64))


@pytest.mark.parametrize("kdim,vdim,bias", [(None, None, True), (6, 10, True), (None, None, False), (6, 10, False)])
def test_mha_state_dict_layout_is_torch(kdim, vdim, bias):
    torch = pytest.importorskip("torch", reason="torch is needed to compare with nn.MultiheadAttention")
    ref = torch.nn.MultiheadAttention(8, 2, kdim=kdim, vdim=vdim, bias=bias)
    mha = MultiHeadAttention(8, 2, kdim=kdim, vdim=vdim, bias=bias, rng=0)
    ours = mha.state_dict()
    assert list(ours) == list(ref.state_dict())
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    # ... and it loads into torch strictly, after which torch reproduces our output.
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in ours.items()})
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    k = np.random.default_rng(2).standard_normal((2, 4, kdim or 8)).astype(np.float32)
    v = np.random.default_rng(3).standard_normal((2, 4, vdim or 8)).astype(np.float32)
    with torch.no_grad():
        t_out, _ = ref(*(torch.from_numpy(a.swapaxes(0, 1).copy()) for a in (x, k, v)))  # torch's default: seq-first
    np.testing.assert_allclose(mha(x, k, v)[0], t_out.numpy().swapaxes(0, 1), **tol(np.float32))


# ---------------------------------------------------------------------------------------------
# MultiHeadAttention vs NumPy (grouped-query attention has no torch equivalent)
# ---------------------------------------------------------------------------------------------

def numpy_mha(mha, query, key, value, mask=None, causal=False, sinks=None):
    """The layer's formula in float64 NumPy, batch-first; returns (out, head-averaged weights)."""
    p = {k: v.astype(np.float64) for k, v in mha.state_dict().items()}
    e, ekv, hd = mha.embed_dim, mha.num_kv_heads * mha.head_dim, mha.head_dim
    if "in_proj_weight" in p:
        wq, wk, wv = np.split(p["in_proj_weight"], [e, e + ekv])
    else:
        wq, wk, wv = p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]
    bq, bk, bv = np.split(p["in_proj_bias"], [e, e + ekv]) if "in_proj_bias" in p else (0, 0, 0)
    q = query.astype(np.float64) @ wq.T + bq
    k = key.astype(np.float64) @ wk.T + bk
    v = value.astype(np.float64) @ wv.T + bv
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]

    def heads(x, n):
        return x.reshape(b, -1, n, hd).transpose(0, 2, 1, 3)

    q, k, v = heads(q, mha.num_heads), heads(k, mha.num_kv_heads), heads(v, mha.num_kv_heads)
    group = mha.num_heads // mha.num_kv_heads
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # query head h reads kv head h // group
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    if causal:
        s = np.where(np.tril(np.ones((lq, lk), bool)), s, -np.inf)
    if sinks is not None:  # one extra column per head that joins the softmax with no value
        s = np.concatenate([s, np.broadcast_to(sinks.astype(np.float64)[:, None, None], s.shape[:3] + (1,))], axis=-1)
    w = softmax_rows(s)[..., :lk]
    out = (w @ v).transpose(0, 2, 1, 3).reshape(b, lq, e) @ p["out_proj.weight"].T
    return out + p.get("out_proj.bias", 0), w.mean(axis=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads,kv_heads,kdim,vdim,lq,lk,mask_kind,causal", [
    (8, 2, None, None, 9, None, None, True),        # GQA self-attention, causal
    (8, 1, None, None, 6, 11, "key_padding", False),  # multi-query cross-attention
    (4, 2, 12, 20, 5, 7, "float", False),           # GQA with separate projections
    (4, 4, None, None, 8, None, "bool", True),       # plain MHA, bool mask and causal
])
def test_mha_matches_numpy(isa, rng, dtype, heads, kv_heads, kdim, vdim, lq, lk, mask_kind, causal):
    e, b = 32, 2
    mha = MultiHeadAttention(e, heads, num_kv_heads=kv_heads, kdim=kdim, vdim=vdim, dtype=dtype, rng=rng)
    sd = mha.state_dict()
    sd["in_proj_bias"] = randn(rng, sd["in_proj_bias"].shape, dtype)       # non-zero biases
    sd["out_proj.bias"] = randn(rng, sd["out_proj.bias"].shape, dtype)
    mha.load_state_dict(sd)
    query = randn(rng, (b, lq, e), dtype)
    self_attention = lk is None
    lk = lq if self_attention else lk
    key = query if self_attention else randn(rng, (b, lk, kdim or e), dtype)
    value = query if self_attention else randn(rng, (b, lk, vdim or e), dtype)
    mask = None
    if mask_kind == "key_padding":
        mask = (rng.random((b, 1, 1, lk)) > 0.3)
        mask[..., 0] = True
    elif mask_kind == "bool":
        mask = rng.random((lq, lk)) > 0.3
        mask[:, 0] = True  # every row keeps a key, also under causal (rows that attend nothing: see below)
    elif mask_kind == "float":
        mask = randn(rng, (heads, lq, lk), dtype)  # per head: broadcast over the batch
    args = (query,) if self_attention else (query, key, value)
    out, weights = mha(*args, mask=mask, causal=causal, need_weights=True)
    ref_out, ref_w = numpy_mha(mha, query, key, value, mask, causal)
    np.testing.assert_allclose(out, ref_out, **tol(dtype))
    np.testing.assert_allclose(weights, ref_w, **tol(dtype))
    np.testing.assert_allclose(weights.sum(-1), 1.0, **tol(dtype))


def test_mha_layouts_agree(rng):
    """seq-first, batch-first and unbatched inputs give the same numbers (views, no layout bugs)."""
    a = MultiHeadAttention(16, 4, num_kv_heads=2, rng=5)
    b = MultiHeadAttention(16, 4, num_kv_heads=2, batch_first=False, rng=5)
    q, kv = randn(rng, (3, 5, 16), np.float32), randn(rng, (3, 7, 16), np.float32)
    out_a, w_a = a(q, kv, need_weights=True)
    out_b, w_b = b(q.swapaxes(0, 1), kv.swapaxes(0, 1), need_weights=True)
    # Not bit-equal: BLAS may block a strided matmul differently.
    np.testing.assert_allclose(out_a, out_b.swapaxes(0, 1), **tol(np.float32))
    np.testing.assert_allclose(w_a, w_b, **tol(np.float32))
    out_1, w_1 = a(q[1], kv[1], need_weights=True)
    np.testing.assert_allclose(out_1, out_a[1], **tol(np.float32))
    np.testing.assert_allclose(w_1, w_a[1], **tol(np.float32))


def test_mha_defaults_and_edge_rows(rng):
    mha = MultiHeadAttention(8, 2, dtype=np.float64, rng=0)
    sd = mha.state_dict()
    sd["out_proj.bias"] = np.arange(8.0)
    mha.load_state_dict(sd)
    x = randn(rng, (2, 4, 8))
    out, weights = mha(x)
    assert weights is None and out.shape == (2, 4, 8)
    # key=value=query by default (one stacked projection; three separate ones give the same up to
    # BLAS rounding); value defaults to key.
    np.testing.assert_array_equal(out, mha(x, x, x)[0])
    np.testing.assert_allclose(out, mha(x, x.copy())[0], **tol(np.float64))
    kv = x[:, :3]
    np.testing.assert_array_equal(mha(x, kv)[0], mha(x, kv, kv)[0])
    # A query that may attend nothing: weights 0, output = the output bias (torch would give NaN).
    mask = np.ones((4, 4), bool)
    mask[2] = False
    out, weights = mha(x, mask=mask, need_weights=True)
    np.testing.assert_array_equal(weights[:, 2], 0.0)
    np.testing.assert_array_equal(out[:, 2], np.broadcast_to(np.arange(8.0), (2, 8)))
    # Float inputs of another dtype are computed in the layer's dtype.
    out32, _ = MultiHeadAttention(8, 2, rng=0)(x)
    assert out32.dtype == np.float32


def test_mha_init_like_torch():
    e = 64
    mha = MultiHeadAttention(e, 8, rng=0, dtype=np.float64)
    w = mha.in_proj_weight
    bound = math.sqrt(6 / (e + 3 * e))  # xavier_uniform over the stacked (3E, E) matrix, as torch
    assert w.shape == (3 * e, e) and np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.03 * bound  # uniform(-a, a) has std a / sqrt(3)
    ow = mha.out_proj_weight
    assert np.abs(ow).max() <= 1 / math.sqrt(e) and np.abs(ow).max() > 0.99 / math.sqrt(e)
    assert not mha.in_proj_bias.any() and not mha.out_proj_bias.any()
    sep = MultiHeadAttention(e, 8, kdim=16, vdim=32, num_kv_heads=2, rng=0)
    for w, fan_in in ((sep.q_proj_weight, e), (sep.k_proj_weight, 16), (sep.v_proj_weight, 32)):
        assert np.abs(w).max() <= math.sqrt(6 / (fan_in + w.shape[0]))
    assert sep.k_proj_weight.shape == (16, 16) and sep.v_proj_weight.shape == (16, 32) and sep.in_proj_weight is None
    # Reproducible from a seed or a Generator; float32 and float64 layers hold the same draws.
    a, b = MultiHeadAttention(16, 2, rng=3), MultiHeadAttention(16, 2, rng=np.random.default_rng(3))
    c = MultiHeadAttention(16, 2, rng=3, dtype=np.float64)
    for name in a.state_dict():
        np.testing.assert_array_equal(a.state_dict()[name], b.state_dict()[name])
        np.testing.assert_array_equal(a.state_dict()[name], c.state_dict()[name].astype(np.float32))
    assert not np.array_equal(a.in_proj_weight, MultiHeadAttention(16, 2, rng=4).in_proj_weight)


def test_mha_state_dict_returns_copies():
    mha = MultiHeadAttention(8, 2, rng=0)
    sd = mha.state_dict()
    sd["in_proj_weight"][:] = 0
    assert mha.in_proj_weight.any()
    sd = mha.state_dict()
    mha.load_state_dict(sd)
    sd["in_proj_weight"][:] = 0
    assert mha.in_proj_weight.any()


@pytest.mark.parametrize("mutate,pattern", [
    (lambda d: d.pop("in_proj_bias"), r"missing keys \['in_proj_bias'\].*bias=False"),
    (lambda d: d.update(extra=np.zeros(1)), r"unexpected keys \['extra'\]"),
    (lambda d: d.update({"out_proj.weight": np.zeros((8, 9))}), r"out_proj\.weight: expected shape \(8, 8\), got \(8, 9\)"),
    (lambda d: (d.pop("in_proj_weight"), d.update(q_proj_weight=0, k_proj_weight=0, v_proj_weight=0)),
     r"missing keys \['in_proj_weight'\].*unexpected keys \['q_proj_weight', 'k_proj_weight', 'v_proj_weight'\].*kdim"),
    (lambda d: (d.pop("out_proj.bias"), d.update({"in_proj_weight": np.zeros(3)})),
     r"missing keys \['out_proj\.bias'\].*in_proj_weight: expected shape \(24, 8\), got \(3,\)"),
])
def test_mha_load_state_dict_errors(mutate, pattern):
    mha = MultiHeadAttention(8, 2, rng=0)
    before = mha.state_dict()
    bad = mha.state_dict()
    mutate(bad)
    with pytest.raises(ValueError, match=pattern):
        mha.load_state_dict(bad)
    for name, value in before.items():  # nothing was loaded
        np.testing.assert_array_equal(mha.state_dict()[name], value)


def test_mha_load_state_dict_type_errors():
    mha = MultiHeadAttention(8, 2, rng=0)
    with pytest.raises(TypeError, match=r"state_dict must be a mapping"):
        mha.load_state_dict([("in_proj_weight", np.zeros((24, 8)))])
    bad = mha.state_dict()
    bad["in_proj_bias"] = np.array(["x"] * 24)
    with pytest.raises(TypeError, match=r"state_dict\['in_proj_bias'\].*real numbers"):
        mha.load_state_dict(bad)


MHA_CONSTRUCTOR_ERRORS = [
    (dict(embed_dim=10, num_heads=3), ValueError, r"embed_dim must be divisible by num_heads.*10.*3"),
    (dict(embed_dim=8, num_heads=0), ValueError, r"num_heads must be >= 1"),
    (dict(embed_dim=8.0, num_heads=2), TypeError, r"embed_dim must be a positive int"),
    (dict(embed_dim=8, num_heads=4, num_kv_heads=3), ValueError, r"num_kv_heads must divide num_heads"),
    (dict(embed_dim=1026, num_heads=2), ValueError, r"head_dim.*at most 512.*513"),
    (dict(embed_dim=8, num_heads=2, kdim=0), ValueError, r"kdim must be >= 1"),
    (dict(embed_dim=8, num_heads=2, dtype=np.complex64), TypeError, r"dtype must be float32 or float64.*complex64"),
    (dict(embed_dim=8, num_heads=2, dtype="int"), TypeError, r"dtype must be float32 or float64"),
    (dict(embed_dim=8, num_heads=2, rng="seed"), TypeError, r"rng must be a numpy\.random\.Generator"),
    (dict(embed_dim=8, num_heads=2, rng=1.5), TypeError, r"rng must be"),
    (dict(embed_dim=8, num_heads=2, bias="yes"), TypeError, r"bias must be a bool"),
    (dict(embed_dim=8, num_heads=2, batch_first=None), TypeError, r"batch_first must be a bool"),
]


@pytest.mark.parametrize("kwargs,exc,pattern", MHA_CONSTRUCTOR_ERRORS, ids=[c[2][:30] for c in MHA_CONSTRUCTOR_ERRORS])
def test_mha_constructor_errors(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        MultiHeadAttention(**kwargs)


def _call_errors():
    x = np.zeros((2, 3, 8), np.float32)
    return [
        ("query_rank", lambda m: m(np.zeros((1, 2, 3, 8), np.float32)), ValueError, r"query must have shape \(B, L, E\)"),
        ("query_width", lambda m: m(np.zeros((2, 3, 7), np.float32)), ValueError, r"query must have 8 features \(embed_dim\)"),
        ("key_width", lambda m: m(x, np.zeros((2, 3, 5), np.float32)), ValueError, r"key must have 8 features \(kdim\)"),
        ("value_width", lambda m: m(x, x, np.zeros((2, 3, 5), np.float32)), ValueError, r"value must have 8 features \(vdim\)"),
        ("value_without_key", lambda m: m(x, value=x), ValueError, r"value was given without key"),
        ("key_rank", lambda m: m(x, x[0]), ValueError, r"key must have the same number of dimensions as query"),
        ("kv_length", lambda m: m(x, x, x[:, :2]), ValueError, r"key and value must have the same batch size and length"),
        ("batch", lambda m: m(x, x[:1]), ValueError, r"query and key must have the same batch size"),
        ("int_query", lambda m: m(x.astype(np.int32)), TypeError, r"query must be a floating-point array.*int32"),
        ("mask", lambda m: m(x, mask=np.ones((3, 4), bool)), ValueError, r"\bmask\b.*broadcastable"),
        ("causal", lambda m: m(x, causal="yes"), ValueError, r"\bcausal\b"),
    ]


@pytest.mark.parametrize("name,call,exc,pattern", _call_errors(), ids=[c[0] for c in _call_errors()])
def test_mha_call_errors(name, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(MultiHeadAttention(8, 2, rng=0))


# ---------------------------------------------------------------------------------------------
# AdditiveAttention
# ---------------------------------------------------------------------------------------------

def numpy_bahdanau(att, query, key, value, mask=None, causal=False):
    """v_a . tanh(q W_q + k W_k), softmax over keys, times value: float64, materialised."""
    wq, wk, va = (att.state_dict()[n].astype(np.float64) for n in ("W_q", "W_k", "v_a"))
    qp, kp = query.astype(np.float64) @ wq, key.astype(np.float64) @ wk
    s = np.tanh(qp[..., :, None, :] + kp[..., None, :, :]) @ va
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    if causal:
        lq, lk = s.shape[-2:]
        s = np.where(np.tril(np.ones((lq, lk), bool)), s, -np.inf)
    w = softmax_rows(s)
    return w @ value.astype(np.float64), w


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch,lq,lk,qdim,kdim,dv,mask_kind,causal", [
    ((2,), 5, 9, 12, 7, 6, None, False),            # cross-attention, all dims different
    ((3,), 6, 6, 8, 8, 8, "bool", True),            # self-attention shapes, mask and causal
    ((2,), 4, 7, 5, 5, 3, "float", False),
    ((), 4, 6, 10, 4, 5, "key_padding", False),     # unbatched
])
def test_additive_matches_numpy(isa, rng, dtype, batch, lq, lk, qdim, kdim, dv, mask_kind, causal):
    att = AdditiveAttention(16, query_dim=qdim, key_dim=kdim, dtype=dtype, rng=rng)
    query = randn(rng, batch + (lq, qdim), dtype)
    key = randn(rng, batch + (lk, kdim), dtype)
    value = randn(rng, batch + (lk, dv), dtype)
    mask = None
    if mask_kind == "bool":
        mask = rng.random(batch + (lq, lk)) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = randn(rng, (lq, lk), dtype)
    elif mask_kind == "key_padding":
        mask = (np.arange(lk) < lk - 2)[None, :]  # (1, Lk): the last two keys are padding
    out, weights = att(query, key, value, mask=mask, causal=causal, need_weights=True)
    ref_out, ref_w = numpy_bahdanau(att, query, key, value, mask, causal)
    assert out.dtype == dtype and out.shape == batch + (lq, dv) and weights.shape == batch + (lq, lk)
    np.testing.assert_allclose(out, ref_out, **tol(dtype))
    np.testing.assert_allclose(weights, ref_w, **tol(dtype))


def test_additive_is_keras_score_after_projection(rng):
    """With identity projections the layer is Keras' AdditiveAttention score with scale v_a."""
    d = 6
    att = AdditiveAttention(d, query_dim=d, key_dim=d, dtype=np.float64)
    v_a = randn(rng, d)
    att.load_state_dict({"W_q": np.eye(d), "W_k": np.eye(d), "v_a": v_a})
    q, k, v = randn(rng, (2, 4, d)), randn(rng, (2, 5, d)), randn(rng, (2, 5, 3))
    out, _ = att(q, k, v)
    np.testing.assert_allclose(out, fusedattn.reference.additive_attention(q, k, v, score_weight=v_a), **tol(np.float64))
    # ... whose weights do not depend on the values, and self-attention is the default.
    np.testing.assert_array_equal(att(q)[0], att(q, q, q)[0])
    assert att(q)[1] is None


def test_additive_lazy_build_and_state_dict(rng):
    lazy = AdditiveAttention(8, rng=7)
    assert not lazy.built and lazy.W_q is None
    with pytest.raises(RuntimeError, match=r"no parameters yet.*query_dim"):
        lazy.state_dict()
    q, k = randn(rng, (2, 3, 5), np.float32), randn(rng, (2, 4, 6), np.float32)
    lazy(q, k)
    eager = AdditiveAttention(8, query_dim=5, key_dim=6, rng=7)
    assert lazy.built and (lazy.query_dim, lazy.key_dim) == (5, 6)
    for name in ("W_q", "W_k", "v_a"):  # the same draws, whenever the layer is built
        np.testing.assert_array_equal(lazy.state_dict()[name], eager.state_dict()[name])
    assert eager.W_q.shape == (5, 8) and eager.W_k.shape == (6, 8) and eager.v_a.shape == (8,)
    assert np.abs(eager.W_q).max() <= math.sqrt(6 / (5 + 8)) and np.abs(eager.v_a).max() <= math.sqrt(3 / 8)
    # load_state_dict into an unbuilt layer adopts the dims.
    fresh = AdditiveAttention(8)
    fresh.load_state_dict(eager.state_dict())
    assert (fresh.query_dim, fresh.key_dim) == (5, 6)
    np.testing.assert_array_equal(fresh(q, k)[0], eager(q, k)[0])


@pytest.mark.parametrize("mutate,exc,pattern", [
    (lambda d: d.pop("v_a"), ValueError, r"missing keys \['v_a'\]"),
    (lambda d: d.update(b=np.zeros(8)), ValueError, r"unexpected keys \['b'\]"),
    (lambda d: d.update(W_k=np.zeros((6, 9))), ValueError, r"W_k: expected shape \(6, 8\), got \(6, 9\)"),
    (lambda d: d.update(W_q=np.zeros((4, 8))), ValueError, r"W_q: expected shape \(5, 8\), got \(4, 8\)"),
    (lambda d: d.update(v_a=np.zeros(8, complex)), TypeError, r"state_dict\['v_a'\].*real numbers"),
])
def test_additive_load_state_dict_errors(mutate, exc, pattern):
    att = AdditiveAttention(8, query_dim=5, key_dim=6, rng=0)
    bad = att.state_dict()
    mutate(bad)
    with pytest.raises(exc, match=pattern):
        att.load_state_dict(bad)


@pytest.mark.parametrize("make,call,exc,pattern", [
    (lambda: AdditiveAttention(0), None, ValueError, r"units must be between 1 and 512"),
    (lambda: AdditiveAttention(513), None, ValueError, r"units must be between 1 and 512, got 513"),
    (lambda: AdditiveAttention(4, query_dim=-1), None, ValueError, r"query_dim must be >= 1"),
    (lambda: AdditiveAttention(4, dtype=np.int64), None, TypeError, r"dtype must be float32 or float64"),
    (lambda: AdditiveAttention(4, query_dim=3, key_dim=3), lambda a: a(np.zeros((2, 5, 4))), ValueError,
     r"query must have 3 features \(query_dim\)"),
    (lambda: AdditiveAttention(4, query_dim=3, key_dim=3), lambda a: a(np.zeros((2, 5, 3)), np.zeros((2, 5, 2))),
     ValueError, r"key must have 3 features \(key_dim\)"),
    (lambda: AdditiveAttention(4), lambda a: a(np.zeros((5, 3)), np.zeros((2, 5, 3))), ValueError,
     r"key must have the same number of dimensions as query"),
    (lambda: AdditiveAttention(4), lambda a: a(np.zeros((2, 5, 3)), np.zeros((2, 5, 3)), np.zeros((2, 4, 3))),
     ValueError, r"key and value must agree"),
    (lambda: AdditiveAttention(4), lambda a: a(np.zeros((2, 5, 3)), np.zeros((3, 5, 3))), ValueError,
     r"query and key must have the same batch size"),
    (lambda: AdditiveAttention(4), lambda a: a(np.zeros((2, 5, 3), np.int16)), TypeError, r"query must be a floating-point"),
    (lambda: AdditiveAttention(4), lambda a: a(np.zeros((5, 3)), value=np.zeros((5, 3))), ValueError,
     r"value was given without key"),
])
def test_additive_errors(make, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        layer = make()
        call(layer)


# ---------------------------------------------------------------------------------------------
# Learned attention sinks (issue #15)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_mha_sinks_forward_and_weights(rng, dtype):
    e, heads, b, lq = 32, 8, 2, 6
    sinks = np.linspace(-2, 3, heads)
    mha = MultiHeadAttention(e, heads, num_kv_heads=2, dtype=dtype, rng=0, sinks=sinks)
    x = randn(rng, (b, lq, e), dtype)
    mask = rng.random((lq, lq)) > 0.3
    mask[:, 0] = True
    out, weights = mha(x, mask=mask, causal=True, need_weights=True)
    ref_out, ref_w = numpy_mha(mha, x, x, x, mask, True, sinks=mha.sinks)
    np.testing.assert_allclose(out, ref_out, **tol(dtype))
    np.testing.assert_allclose(weights, ref_w, **tol(dtype))
    assert np.all(weights.sum(-1) < 1)  # each head's sink keeps part of every row
    plain = MultiHeadAttention(e, heads, num_kv_heads=2, dtype=dtype, rng=0)  # same rng: same weights
    sd = mha.state_dict()
    assert list(sd) == list(plain.state_dict()) + ["sinks"]
    for name, value in plain.state_dict().items():
        np.testing.assert_array_equal(sd[name], value)


def test_mha_sinks_state_dict_round_trip():
    a = MultiHeadAttention(16, 4, rng=0, sinks=True)
    np.testing.assert_array_equal(a.sinks, np.zeros(4, np.float32))  # sinks=True starts at 0
    sd = a.state_dict()
    sd["sinks"] = np.array([0.5, -1.0, 2.0, 0.0])
    b = MultiHeadAttention(16, 4, rng=1, sinks=True)
    b.load_state_dict(sd)
    assert b.sinks.dtype == np.float32 and b.sinks.tolist() == [0.5, -1.0, 2.0, 0.0]
    assert set(b.state_dict()) == set(sd) and "sinks=True" in repr(b)
    b.sinks[0] = 9  # state_dict() copies: this does not reach the copy below
    with pytest.raises(ValueError, match=r"unexpected keys \['sinks'\].*construct the layer with sinks=True"):
        MultiHeadAttention(16, 4, rng=0).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"missing keys \['sinks'\].*no attention sinks"):
        b.load_state_dict(MultiHeadAttention(16, 4, rng=0).state_dict())
    with pytest.raises(ValueError, match=r"sinks: expected shape \(4,\), got \(3,\)"):
        b.load_state_dict({**sd, "sinks": np.zeros(3)})
    with pytest.raises(ValueError, match=r"sinks must have shape \(num_heads,\) = \(4,\).*got \(2,\)"):
        MultiHeadAttention(16, 4, sinks=np.zeros(2))
    with pytest.raises(TypeError, match=r"sinks must be True, False/None or a \(4,\) float array"):
        MultiHeadAttention(16, 4, sinks=np.array(["a"] * 4))
    with pytest.raises(ValueError, match=r"sinks must be finite"):
        MultiHeadAttention(16, 4, sinks=np.array([0, 0, 0, np.nan]))
    assert MultiHeadAttention(16, 4, sinks=False).sinks is None
