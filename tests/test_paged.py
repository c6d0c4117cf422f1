"""Paged attention (vLLM layout), PagedKVCache, int8 K/V with per-token scales, and attention sinks.

The oracle is written here in float64 NumPy: gather each sequence's tokens through its block table, then
softmax (with the sink in the denominator) times the values. Tolerances: conftest's (float32 2e-5,
float64 1e-12) for float caches; int8 results are compared with the float64 computation on the
dequantised cache (the same tolerances: the kernel computes exactly that) and, against the unquantised
data, with a bound derived from the scales (test_int8_error_within_the_scale_bound).
"""
from __future__ import annotations

import numpy as np
import pytest

import fusedattn
from conftest import HALF_DTYPE_PARAMS, randn, tol
from fusedattn import reference
from fusedattn.paged import PagedKVCache, check_paged_args
from fusedattn.quant import quantize_kv


DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]


# ---------------------------------------------------------------------------------------------
# The float64 oracle
# ---------------------------------------------------------------------------------------------

def gather_seq(cache, table_row, n):
    """Tokens 0..n-1 of one sequence as ``(Hkv, n, ...)`` float64."""
    bs = cache.shape[1]
    blocks = np.asarray(table_row[:-(-n // bs)], np.intp)
    tokens = cache[blocks].reshape((-1,) + cache.shape[2:])[:n]
    return np.moveaxis(tokens.astype(np.float64), 0, 1)


def ref_paged(q, kc, vc, table, lens, *, causal="bottom_right", sinks=None, k_scale=None, v_scale=None, scale=None):
    """``(out, lse)`` in float64: token by token what attention_paged promises."""
    b, hq, lq, d = q.shape
    hkv, dv = kc.shape[2], vc.shape[3]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros((b, hq, lq, dv))
    lse = np.full((b, hq, lq), -np.inf)
    for i in range(b):
        n = int(lens[i])
        k, v = gather_seq(kc, table[i], n), gather_seq(vc, table[i], n)
        if k_scale is not None:
            k = k * gather_seq(k_scale, table[i], n)[..., None]
            v = v * gather_seq(v_scale, table[i], n)[..., None]
        group = hq // hkv
        k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
        s = np.einsum("hqd,hkd->hqk", q[i].astype(np.float64), k) * scale
        if causal:
            pos = n - lq + np.arange(lq)  # query i's position in its sequence
            s = np.where(np.arange(n)[None, None, :] <= pos[None, :, None], s, -np.inf)
        cols = [s]
        if sinks is not None:
            cols.append(np.broadcast_to(np.asarray(sinks, np.float64)[:, None, None], (hq, lq, 1)))
        s_all = np.concatenate(cols, axis=-1)
        m = s_all.max(axis=-1, keepdims=True) if s_all.shape[-1] else np.full((hq, lq, 1), -np.inf)
        m = np.where(np.isfinite(m), m, 0.0)
        e = np.exp(s_all - m)
        denom = e.sum(axis=-1)
        with np.errstate(divide="ignore"):
            lse[i] = np.log(denom) + m[..., 0]
        p = np.where(denom[..., None] > 0, e / np.where(denom > 0, denom, 1)[..., None], 0.0)[..., :n]
        out[i] = p @ v
    return out, lse


def scatter(rng, seqs_k, seqs_v, block_size, *, spare=3, pad=-1, dtype=np.float32):
    """Write per-sequence ``(Hkv, n, D)`` arrays into a shuffled pool; return ``(kc, vc, table, lens)``.

    Blocks are assigned in a random order (a sequence's blocks are scattered over the pool), the pool
    has ``spare`` unused blocks full of garbage, and the table's unused entries hold ``pad``.
    """
    hkv, d, dv = seqs_k[0].shape[0], seqs_k[0].shape[2], seqs_v[0].shape[2]
    lens = np.array([k.shape[1] for k in seqs_k], np.int32)
    need = [-(-int(n) // block_size) for n in lens]
    total = sum(need) + spare
    ids = rng.permutation(total)
    kc = randn(rng, (total, block_size, hkv, d), dtype, scale=100.0)  # garbage: must never be read
    vc = randn(rng, (total, block_size, hkv, dv), dtype, scale=100.0)
    table = np.full((len(seqs_k), max(need + [1]) + 1), pad, np.int32)
    pos = 0
    for i, (k, v) in enumerate(zip(seqs_k, seqs_v)):
        n = k.shape[1]
        for j in range(need[i]):
            blk = ids[pos]
            pos += 1
            table[i, j] = blk
            t0, t1 = j * block_size, min((j + 1) * block_size, n)
            kc[blk, :t1 - t0] = np.moveaxis(k[:, t0:t1], 0, 1)
            vc[blk, :t1 - t0] = np.moveaxis(v[:, t0:t1], 0, 1)
    return kc, vc, table, lens


def ragged(rng, lengths, hkv, d, dv, dtype=np.float32):
    ks = [randn(rng, (hkv, n, d), dtype) for n in lengths]
    vs = [randn(rng, (hkv, n, dv), dtype) for n in lengths]
    return ks, vs


# ---------------------------------------------------------------------------------------------
# attention_paged vs the contiguous computation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("group", [1, 4, 8], ids=["mha", "gqa4", "gqa8"])
def test_paged_matches_contiguous(rng, dtype, block_size, group):
    hkv, d, dv = 2, 16, 12
    lengths = [0, 1, 17, 40, 5]  # empty, one token, partial and several blocks
    ks, vs = ragged(rng, lengths, hkv, d, dv, dtype)
    kc, vc, table, lens = scatter(rng, ks, vs, block_size, dtype=dtype)
    for lq in (1, 3):  # decoding, and a chunk longer than some sequences (their early queries see nothing)
        q = randn(rng, (len(lengths), hkv * group, lq, d), dtype)
        out, lse = fusedattn.attention_paged(q, kc, vc, table, lens, return_lse=True)
        ref_out, ref_lse = ref_paged(q, kc, vc, table, lens)
        assert out.dtype == dtype and out.shape == (len(lengths), hkv * group, lq, dv)
        np.testing.assert_allclose(out, ref_out, **tol(dtype))
        assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
        finite = np.isfinite(ref_lse)
        np.testing.assert_allclose(lse[finite], ref_lse[finite], **tol(dtype))
        assert np.all(out[0] == 0)  # the empty sequence


def test_paged_options_match_attention_on_gathered(rng):
    """window / softcap / ALiBi / scale / causal=False: each sequence's result is attention() on its tokens."""
    hkv, hq, d, bs = 2, 4, 8, 4
    lengths = [3, 9, 14]
    ks, vs = ragged(rng, lengths, hkv, d, d)
    kc, vc, table, lens = scatter(rng, ks, vs, bs)
    q = randn(rng, (3, hq, 2, d))
    slopes = np.linspace(0.1, 0.8, hq).astype(np.float32)
    for kwargs in (dict(window=(4, 0)), dict(softcap=2.0), dict(alibi_slopes=slopes), dict(scale=0.3),
                   dict(causal=False), dict(causal=False, window=(2, 1))):
        out = fusedattn.attention_paged(q, kc, vc, table, lens, **kwargs)
        for i, (k, v) in enumerate(zip(ks, vs)):
            rest = {n: x for n, x in kwargs.items() if n != "causal"}
            expected = reference.attention(q[i:i + 1], k[None], v[None], causal=kwargs.get("causal", "bottom_right"),
                                           **rest)
            np.testing.assert_allclose(out[i:i + 1], expected, **tol(np.float32), err_msg=str(kwargs))


def test_paged_alibi_per_sequence(rng):
    hkv, hq, d, bs = 1, 2, 8, 3
    ks, vs = ragged(rng, [4, 7], hkv, d, d)
    kc, vc, table, lens = scatter(rng, ks, vs, bs)
    q = randn(rng, (2, hq, 1, d))
    slopes = np.array([[0.1, 0.2], [0.5, 1.0]], np.float32)
    out = fusedattn.attention_paged(q, kc, vc, table, lens, alibi_slopes=slopes)
    for i in range(2):
        expected = reference.attention(q[i:i + 1], ks[i][None], vs[i][None], causal="bottom_right",
                                       alibi_slopes=slopes[i])
        np.testing.assert_allclose(out[i:i + 1], expected, **tol(np.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_paged_sinks(rng, dtype):
    hkv, hq, d, bs = 2, 8, 16, 5
    lengths = [0, 1, 12, 30]
    ks, vs = ragged(rng, lengths, hkv, d, d, dtype)
    kc, vc, table, lens = scatter(rng, ks, vs, bs, dtype=dtype)
    q = randn(rng, (4, hq, 2, d), dtype)
    sinks = randn(rng, (hq,), dtype, scale=2.0)
    out, lse = fusedattn.attention_paged(q, kc, vc, table, lens, sinks=sinks, return_lse=True)
    ref_out, ref_lse = ref_paged(q, kc, vc, table, lens, sinks=sinks)
    np.testing.assert_allclose(out, ref_out, **tol(dtype))
    np.testing.assert_allclose(lse, ref_lse, **tol(dtype))  # always finite: the sink is in every row
    np.testing.assert_allclose(lse[0], np.broadcast_to(sinks[:, None], (hq, 2)), **tol(dtype))


def test_paged_out_and_padding_ignored(rng):
    """``out=`` is written; the table's padding (anything, even huge or negative) is never read."""
    ks, vs = ragged(rng, [6, 2], 1, 8, 8)
    kc, vc, table, lens = scatter(rng, ks, vs, 4, pad=-7)
    table64 = table.astype(np.int64)
    table64[table64 < 0] = 2 ** 40
    q = randn(rng, (2, 1, 1, 8))
    out = np.empty((2, 1, 1, 8), np.float32)
    assert fusedattn.attention_paged(q, kc, vc, table64, lens, out=out) is out
    np.testing.assert_allclose(out, ref_paged(q, kc, vc, table, lens)[0], **tol(np.float32))
    np.testing.assert_array_equal(fusedattn.attention_paged(q, kc, vc, table, lens), out)


# ---------------------------------------------------------------------------------------------
# Validation: every error names the argument, what was expected and what was received
# ---------------------------------------------------------------------------------------------

def _valid_call():
    kc = np.zeros((4, 3, 2, 8), np.float32)
    vc = np.zeros((4, 3, 2, 6), np.float32)
    q = np.zeros((2, 4, 1, 8), np.float32)
    table = np.array([[0, 1, 2], [3, 0, 0]], np.int32)
    lens = np.array([7, 3], np.int32)
    return dict(q=q, key_cache=kc, value_cache=vc, block_table=table, seq_lens=lens)


def _int8_call():
    args = _valid_call()
    args["key_cache"] = args["key_cache"].astype(np.int8)
    args["value_cache"] = args["value_cache"].astype(np.int8)
    scales = np.ones((4, 3, 2), np.float32)
    return args, dict(k_scale=scales, v_scale=scales)


def _with(**changes):
    args = _valid_call()
    args.update(changes)
    return args


BAD_CALLS = [
    (_with(key_cache=np.zeros((4, 3, 2), np.float32)), {}, ValueError,
     r"key_cache must have shape \(num_blocks, block_size, Hkv, D\), got shape \(4, 3, 2\)"),
    (_with(value_cache=np.zeros((4, 3, 2, 6), np.float64)), {}, TypeError,
     r"key_cache and value_cache must have the same dtype, got float32 and float64"),
    (_with(value_cache=np.zeros((4, 3, 1, 6), np.float32)), {}, ValueError,
     r"value_cache must have shape \(num_blocks=4, block_size=3, Hkv=2, Dv\).*got \(4, 3, 1, 6\)"),
    (_with(key_cache=np.zeros((4, 3, 2, 8), np.int32), value_cache=np.zeros((4, 3, 2, 6), np.int32)), {},
     TypeError, r"key_cache must have dtype float32, float64, float16 or bfloat16 \(ml_dtypes\) or int8, got int32"),
    (_with(q=np.zeros((2, 4, 1, 8), np.float64)), {}, TypeError, r"q must have the caches' dtype float32, got float64"),
    (_with(q=np.zeros((2, 4, 8), np.float32)), {}, ValueError, r"q must have shape \(B, Hq, Lq, D\), got shape \(2, 4, 8\)"),
    (_with(q=np.zeros((2, 4, 1, 7), np.float32)), {}, ValueError, r"q's head dim must be the key cache's D=8"),
    (_with(q=np.zeros((2, 3, 1, 8), np.float32)), {}, ValueError,
     r"Hq must be a positive multiple of the caches' Hkv=2.*got Hq=3"),
    (_with(q=np.zeros((2, 4, 0, 8), np.float32)), {}, ValueError, r"at least one query per sequence \(Lq >= 1\)"),
    (_with(block_table=np.array([0, 1, 2], np.int32)), {}, ValueError,
     r"block_table must have shape \(B=2, max_blocks_per_seq\), got shape \(3,\)"),
    (_with(block_table=np.array([[0, 1, 2]], np.int32)), {}, ValueError,
     r"block_table must have one row per sequence of q.*got \(1, 3\)"),
    (_with(block_table=np.zeros((2, 3), np.float32)), {}, TypeError, r"block_table must be an integer array.*float32"),
    (_with(block_table=np.zeros((2, 3), bool)), {}, TypeError, r"block_table must be an integer array.*bool"),
    (_with(seq_lens=np.array([[7, 3]], np.int32)), {}, ValueError, r"seq_lens must have shape \(B,\) = \(2,\), got shape \(1, 2\)"),
    (_with(seq_lens=np.array([7, 3, 1], np.int32)), {}, ValueError, r"seq_lens must have shape \(B,\) = \(2,\), got \(3,\)"),
    (_with(seq_lens=np.array([7.0, 3.0])), {}, TypeError, r"seq_lens must be an integer array.*float64"),
    (_with(seq_lens=np.array([7, -1], np.int32)), {}, ValueError, r"seq_lens must be >= 0, got seq_lens\[1\] = -1"),
    (_with(seq_lens=np.array([10, 3], np.int32)), {}, ValueError,
     r"seq_lens\[0\] = 10 exceeds what block_table's row can hold: max_blocks_per_seq=3 x block_size=3 = 9 tokens"),
    (_with(block_table=np.array([[0, 4, 2], [3, 0, 0]], np.int32)), {}, ValueError,
     r"block_table\[0, 1\] = 4 is not a block of the pool: block ids must be in \[0, num_blocks=4\).*= 3 entries"),
    (_with(block_table=np.array([[0, 1, 2], [-1, 0, 0]], np.int32)), {}, ValueError,
     r"block_table\[1, 0\] = -1 is not a block of the pool"),
    (_valid_call(), dict(causal=True), ValueError, r"causal must be 'bottom_right' or False for paged attention.*got True"),
    (_valid_call(), dict(causal="top_left"), ValueError, r"causal must be 'bottom_right' or False.*'top_left'"),
    (_valid_call(), dict(sinks=np.zeros(2, np.float32)), ValueError, r"sinks must have shape \(Hq,\) = \(4,\).*got \(2,\)"),
    (_valid_call(), dict(sinks=np.zeros(4, np.int32)), TypeError, r"sinks must be a float array, got dtype int32"),
    (_valid_call(), dict(k_scale=np.ones((4, 3, 2), np.float32), v_scale=np.ones((4, 3, 2), np.float32)), ValueError,
     r"k_scale / v_scale are for int8 caches only, got float32 caches"),
    (_valid_call(), dict(k_scale=np.ones((4, 3, 2), np.float32)), ValueError,
     r"k_scale and v_scale must be given together.*got k_scale only"),
    (_int8_call()[0], {}, ValueError, r"int8 caches need their per-token scales: pass k_scale= and v_scale= of shape"),
    (_int8_call()[0], dict(k_scale=np.ones((4, 3, 2), np.float64), v_scale=np.ones((4, 3, 2), np.float32)), TypeError,
     r"k_scale must have dtype float32, got float64"),
    (_int8_call()[0], dict(k_scale=np.ones((4, 3, 2), np.float32), v_scale=np.ones((4, 3), np.float32)), ValueError,
     r"v_scale must have shape \(num_blocks, block_size, Hkv\) = \(4, 3, 2\), got \(4, 3\)"),
    (dict(_int8_call()[0], q=np.zeros((2, 4, 1, 8), np.int32)), _int8_call()[1], TypeError,
     r"q must have dtype float32, float64, float16 or bfloat16 \(ml_dtypes\) with int8 caches, got int32"),
    (_valid_call(), dict(alibi_slopes=np.ones(3, np.float32)), ValueError,
     r"alibi_slopes must have shape \(Hq,\) = \(4,\) or \(B, Hq\) = \(2, 4\), got \(3,\)"),
    (_valid_call(), dict(out=np.zeros((2, 4, 1, 8), np.float32)), ValueError,
     r"out must be a float32 array of shape \(B, Hq, Lq, Dv\) = \(2, 4, 1, 6\), got float32 \(2, 4, 1, 8\)"),
    (_valid_call(), dict(out=np.zeros((2, 4, 1, 6), np.float64)), ValueError, r"out must be a float32 array.*got float64"),
]


@pytest.mark.parametrize("args,kwargs,exc,pattern", BAD_CALLS, ids=[str(i) for i in range(len(BAD_CALLS))])
def test_validation_errors(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        check_paged_args(**args, **kwargs)
    with pytest.raises(exc, match=pattern):  # the public entry point runs the same checks before any read
        fusedattn.attention_paged(**args, **kwargs)


def test_validation_accepts_and_normalises():
    args = _valid_call()
    table, lens = check_paged_args(**args)
    assert table is args["block_table"] and lens is args["seq_lens"]  # int32 contiguous: no copy
    args.update(block_table=[[0, 1, 2], [3, 99, -5]], seq_lens=[7, 3])  # padding beyond ceil(3/3)=1 is ignored
    table, lens = check_paged_args(**args)
    assert table.dtype == lens.dtype == np.int32 and table.flags.c_contiguous
    assert lens.tolist() == [7, 3] and table[1, 0] == 3
    args["seq_lens"] = [9, 0]  # a full table row; an empty sequence reads nothing
    check_paged_args(**args)
    int8_args, scales = _int8_call()
    check_paged_args(**int8_args, **scales)


INDEX_ERRORS = [case for case in BAD_CALLS if "seq_lens" in case[3] or "block_table" in case[3]]


@pytest.mark.parametrize("args,kwargs,exc,pattern", INDEX_ERRORS, ids=[str(i) for i in range(len(INDEX_ERRORS))])
def test_index_errors_without_the_compiled_check(args, kwargs, exc, pattern, monkeypatch):
    """Where the extension is missing, the NumPy checks alone raise every index error (they also name the
    fault when the compiled pass finds one)."""
    monkeypatch.setattr(fusedattn._backend, "_core", None)
    with pytest.raises(exc, match=pattern):
        check_paged_args(**args, **kwargs)


def _indices_valid_oracle(table, lens, block_size, num_blocks):
    if (lens < 0).any() or (lens > table.shape[1] * block_size).any():
        return False
    used = np.arange(table.shape[1])[None, :] < -(-lens.astype(np.int64) // block_size)[:, None]
    return bool(((table >= 0) & (table < num_blocks) | ~used).all())


def test_compiled_index_check_matches_numpy(rng):
    """_core.paged_indices_valid, the one pass a decode step pays for its table, against the NumPy
    definition: random tables whose faults (ids -1 / num_blocks / INT32 extremes, lengths -1 / capacity + 1)
    sit in used entries or in padding, lengths at 0 and at capacity, empty batches."""
    core = fusedattn._backend._core
    if core is None:
        pytest.skip("needs the compiled extension (fusedattn._core)")
    extremes = np.array([-1, -(2**31), 2**31 - 1], np.int64)
    verdicts = []
    for trial in range(400):
        b, max_blocks, block_size = int(rng.integers(0, 5)), int(rng.integers(1, 40)), int(rng.integers(1, 20))
        num_blocks = int(rng.integers(1, 64))
        table = rng.integers(0, num_blocks, (b, max_blocks)).astype(np.int32)
        lens = rng.integers(0, max_blocks * block_size + 1, b).astype(np.int32)
        if b and trial % 4 == 1:  # a length at an edge, or just past one
            lens[rng.integers(b)] = rng.choice([0, max_blocks * block_size, -1, max_blocks * block_size + 1])
        if b and trial % 2 == 0:  # a bad id somewhere: in a used entry or in padding
            bad = rng.choice(np.concatenate([extremes, [num_blocks]]))
            table[rng.integers(b), rng.integers(max_blocks)] = bad
        expected = _indices_valid_oracle(table, lens, block_size, num_blocks)
        assert core.paged_indices_valid(table, lens, block_size, num_blocks) is expected, (table, lens, block_size)
        verdicts.append(expected)
    assert 50 < sum(verdicts) < 350  # both answers drawn often


def test_int32_tables_take_the_compiled_check(monkeypatch):
    """int32 C-contiguous tables and lengths (PagedKVCache's) are checked by the compiled pass and returned as
    they are; other dtypes and strided views by NumPy (and converted)."""
    core = fusedattn._backend._core
    if core is None:
        pytest.skip("needs the compiled extension (fusedattn._core)")
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(core, name)

        def paged_indices_valid(self, *args):
            calls.append(args)
            return core.paged_indices_valid(*args)

    monkeypatch.setattr(fusedattn._backend, "_core", Spy())
    args = _valid_call()
    table, lens = check_paged_args(**args)
    assert len(calls) == 1 and table is args["block_table"] and lens is args["seq_lens"]
    wide = np.zeros((2, 6), np.int32)
    wide[:, ::2] = args["block_table"]
    for changes in (dict(block_table=args["block_table"].astype(np.int64)), dict(seq_lens=args["seq_lens"].astype(np.int64)),
                    dict(block_table=wide[:, ::2])):
        table, lens = check_paged_args(**_with(**changes))
        assert len(calls) == 1, changes
        np.testing.assert_array_equal(table, args["block_table"])
        assert table.dtype == lens.dtype == np.int32 and table.flags.c_contiguous


# ---------------------------------------------------------------------------------------------
# quantize_kv
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16], ids=["f32", "f64", "f16"])
def test_quantize_round_trip_bound(rng, dtype):
    x = randn(rng, (3, 2, 50, 24), dtype, scale=3.0)
    x[0, 0, 0] = 0  # an all-zero row: scale 0, codes 0
    x[1, 1, 1] *= 1e-30 if dtype != np.float16 else 1e-3
    codes, scale = quantize_kv(x)
    assert codes.dtype == np.int8 and codes.shape == x.shape
    assert scale.dtype == np.float32 and scale.shape == x.shape[:-1]
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(scale, np.abs(x64).max(axis=-1) / 127, rtol=1e-7)
    deq = codes * scale.astype(np.float64)[..., None]
    assert np.all(np.abs(x64 - deq) <= scale.astype(np.float64)[..., None] / 2)
    assert np.all(np.abs(codes).max(axis=-1)[scale > 0] == 127) and codes.min() >= -127
    assert scale[0, 0, 0] == 0 and np.all(codes[0, 0, 0] == 0)


def test_quantize_bfloat16_and_lists():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array([[1.0, -0.5, 0.25]], dtype=ml_dtypes.bfloat16)
    codes, scale = quantize_kv(x)
    assert codes.tolist() == [[127, -64, 32]] and scale.dtype == np.float32  # -63.5 rounds to even: -64
    codes, scale = quantize_kv([2.54, -1.27])
    assert codes.tolist() == [127, -64] and scale.shape == ()


def test_quantize_errors():
    with pytest.raises(ValueError, match=r"x must be finite"):
        quantize_kv(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match=r"x must be finite"):
        quantize_kv(np.array([[1.0, np.inf]]))
    with pytest.raises(TypeError, match=r"x must have dtype float32, float64, float16 or bfloat16.*int64"):
        quantize_kv(np.ones((2, 3), np.int64))
    with pytest.raises(ValueError, match=r"x must have at least 1 dimension"):
        quantize_kv(np.float32(1.0))


# ---------------------------------------------------------------------------------------------
# int8 caches: exact on the dequantised values, and within a bound derived from the scales
# ---------------------------------------------------------------------------------------------

def _quantized_pool(rng, lengths, hkv, d, dv, bs):
    ks, vs = ragged(rng, lengths, hkv, d, dv)
    kc, vc, table, lens = scatter(rng, ks, vs, bs)
    (kq, k_scale), (vq, v_scale) = quantize_kv(kc), quantize_kv(vc)
    return ks, vs, kq, vq, k_scale, v_scale, table, lens


@pytest.mark.parametrize("group", [1, 4, 8], ids=["mha", "gqa4", "gqa8"])
def test_int8_paged_matches_dequantised(rng, group):
    hkv, d, dv, bs = 2, 32, 16, 16
    ks, vs, kq, vq, k_scale, v_scale, table, lens = _quantized_pool(rng, [0, 1, 20, 47], hkv, d, dv, bs)
    q = randn(rng, (4, hkv * group, 2, d))
    out, lse = fusedattn.attention_paged(q, kq, vq, table, lens, k_scale=k_scale, v_scale=v_scale, return_lse=True)
    ref_out, ref_lse = ref_paged(q, kq, vq, table, lens, k_scale=k_scale, v_scale=v_scale)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref_out, **tol(np.float32))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], **tol(np.float32))


@pytest.mark.parametrize("qdtype", [pytest.param(np.float64, id="f64")] + HALF_DTYPE_PARAMS)
def test_int8_paged_any_query_dtype(rng, qdtype):
    """A float64 q (NumPy's default) computes in float64 against the dequantised int8 pool; a 16-bit q in
    float32, its output rounded to q's dtype (half an ulp: 2^-11 float16, 2^-9 bfloat16; atol = rtol =
    2e-3 and 1.6e-2 leave room for the rounding of the 16-bit inputs' products in float32)."""
    if qdtype is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    hkv, d, dv, bs = 2, 32, 16, 16
    ks, vs, kq, vq, k_scale, v_scale, table, lens = _quantized_pool(rng, [0, 1, 20, 47], hkv, d, dv, bs)
    q = randn(rng, (4, hkv * 4, 2, d), np.float64).astype(qdtype)
    out, lse = fusedattn.attention_paged(q, kq, vq, table, lens, k_scale=k_scale, v_scale=v_scale, return_lse=True)
    ref_out, ref_lse = ref_paged(q.astype(np.float64), kq, vq, table, lens, k_scale=k_scale, v_scale=v_scale)
    assert out.dtype == qdtype
    limit = 1e-12 if qdtype is np.float64 else (2e-3 if qdtype is np.float16 else 1.6e-2)
    np.testing.assert_allclose(out.astype(np.float64), ref_out, atol=limit, rtol=limit)
    finite = np.isfinite(ref_lse)
    lse_limit = 1e-12 if qdtype is np.float64 else 2e-5
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=lse_limit, rtol=lse_limit)
    cache = PagedKVCache(hkv, d, value_dim=dv, block_size=bs, dtype=np.int8)
    sid = cache.add_sequence()
    cache.append(sid, ks[3], vs[3])
    got = cache.attend(q[3:], [sid])
    table3, lens3 = cache.block_table([sid])
    want = ref_paged(q[3:].astype(np.float64), cache.key_cache, cache.value_cache, table3, lens3,
                     k_scale=cache.key_scales, v_scale=cache.value_scales)[0]
    assert got.dtype == qdtype
    np.testing.assert_allclose(got.astype(np.float64), want, atol=limit, rtol=limit)


def test_int8_error_within_the_scale_bound(rng):
    """int8 K/V against the unquantised float K/V, within a bound derived from the scales (not a guess).

    Keys: every element of k_j is off by at most k_scale_j / 2 (round to nearest), so the score
    s_j = c * q.k_j is off by |ds_j| <= c * sum_d |q_d| * k_scale_j / 2 =: delta_j, and with
    delta = max_j delta_j over the row's visible keys every probability moves by a factor within
    [e^-2delta, e^2delta] (numerator and denominator each move by at most e^delta): |dp_j| <= p_j (e^2delta - 1).
    Since sum_j dp_j = 0, the keys' part of the output error is sum_j dp_j (v_j - o) <= (e^2delta - 1) *
    sum_j p_j |v_j - o| per element. Values: each element of v_j is off by at most v_scale_j / 2, and the
    perturbed probabilities sum to 1, so their part is <= max_j v_scale_j / 2. The lse moves by <= delta.
    A float32 rounding allowance (1e-5) is added; p and o are the float64 truth.
    """
    hkv, hq, d, bs = 2, 8, 64, 16
    lengths = [1, 33, 200, 511]
    ks, vs, kq, vq, k_scale, v_scale, table, lens = _quantized_pool(rng, lengths, hkv, d, d, bs)
    q = randn(rng, (len(lengths), hq, 1, d))
    out, lse = fusedattn.attention_paged(q, kq, vq, table, lens, k_scale=k_scale, v_scale=v_scale, return_lse=True)
    c = 1.0 / np.sqrt(d)
    group = hq // hkv
    worst = 0.0
    for i, n in enumerate(lengths):
        k = np.repeat(ks[i].astype(np.float64), group, axis=0)  # (hq, n, d), unquantised
        v = np.repeat(vs[i].astype(np.float64), group, axis=0)
        ksc = np.repeat(gather_seq(k_scale, table[i], n), group, axis=0)  # (hq, n)
        vsc = np.repeat(gather_seq(v_scale, table[i], n), group, axis=0)
        qi = q[i, :, 0].astype(np.float64)  # (hq, d)
        s = np.einsum("hd,hkd->hk", qi, k) * c
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        o = np.einsum("hk,hkd->hd", p, v)
        true_lse = np.log(np.exp(s - s.max(axis=1, keepdims=True)).sum(axis=1)) + s.max(axis=1)
        delta = (c * np.abs(qi).sum(axis=1)[:, None] * ksc / 2).max(axis=1)  # (hq,)
        key_part = np.expm1(2 * delta)[:, None] * np.einsum("hk,hkd->hd", p, np.abs(v - o[:, None, :]))
        value_part = vsc.max(axis=1)[:, None] / 2
        bound = key_part + value_part + 1e-5
        err = np.abs(out[i, :, 0].astype(np.float64) - o)
        assert np.all(err <= bound), f"sequence {i}: error {err.max():.3g} above its bound"
        assert np.all(np.abs(lse[i, :, 0] - true_lse) <= delta + 1e-5)
        worst = max(worst, float((err / bound).max()))
    # Measured ~0.996: the one-token sequence's error is its value rounding alone, which the bound meets exactly.
    assert 0 < worst < 1


# ---------------------------------------------------------------------------------------------
# PagedKVCache
# ---------------------------------------------------------------------------------------------

def _append_random(rng, cache, history, seq_ids, counts, dtype=np.float32):
    ks = [randn(rng, (cache.num_kv_heads, n, cache.head_dim), dtype) for n in counts]
    vs = [randn(rng, (cache.num_kv_heads, n, cache.value_dim), dtype) for n in counts]
    cache.append(seq_ids, ks, vs)
    for s, k, v in zip(seq_ids, ks, vs):
        hk, hv = history.get(s, (np.zeros((cache.num_kv_heads, 0, cache.head_dim), dtype),
                                 np.zeros((cache.num_kv_heads, 0, cache.value_dim), dtype)))
        history[s] = (np.concatenate([hk, k], axis=1), np.concatenate([hv, v], axis=1))


def _expected(q, history, seq_ids, sinks=None):
    """float64 attention of each sequence's queries to its whole history (bottom-right causal)."""
    outs = []
    for i, s in enumerate(seq_ids):
        k, v = history[s]
        n = k.shape[1]
        kc = np.zeros((1, max(n, 1)) + (k.shape[0], k.shape[2]))  # one block holding the whole sequence
        vc = np.zeros((1, max(n, 1)) + (v.shape[0], v.shape[2]))
        kc[0, :n], vc[0, :n] = np.moveaxis(k, 1, 0), np.moveaxis(v, 1, 0)
        table = np.zeros((1, 1), np.int32)
        outs.append(ref_paged(q[i:i + 1], kc, vc, table, np.array([n]), sinks=sinks)[0])
    return np.concatenate(outs)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_cache_ragged_decoding(rng, dtype, block_size):
    cache = PagedKVCache(2, 16, value_dim=8, block_size=block_size, dtype=dtype)
    history = {}
    ids = [cache.add_sequence() for _ in range(4)]
    _append_random(rng, cache, history, ids, [0, 1, 7, 23], dtype)  # ragged prompts, one empty
    for step in range(6):
        live = ids if step < 3 else ids[1:]  # sequences may leave the batch
        _append_random(rng, cache, history, live, [1] * len(live), dtype)
        q = randn(rng, (len(live), 8, 1, 16), dtype)
        out = cache.attend(q, live)
        np.testing.assert_allclose(out, _expected(q, history, live), **tol(dtype))
    for s in ids:
        k, v = cache.gather(s)
        np.testing.assert_array_equal(k, history[s][0])
        np.testing.assert_array_equal(v, history[s][1])
        assert cache.seq_len(s) == history[s][0].shape[1]
    assert len(cache) == 4 and cache.seq_ids == ids


def test_cache_chunked_prefill_and_sinks(rng):
    cache = PagedKVCache(1, 8, block_size=4)
    history = {}
    a, b = cache.add_sequence(), cache.add_sequence()
    _append_random(rng, cache, history, [a, b], [10, 3])
    q = randn(rng, (2, 4, 3, 8))  # three queries each: the last three tokens of each sequence
    sinks = np.array([0.0, 1.0, -2.0, 3.0], np.float32)
    out, lse = cache.attend(q, [a, b], sinks=sinks, return_lse=True)
    np.testing.assert_allclose(out, _expected(q, history, [a, b], sinks=sinks), **tol(np.float32))
    assert lse.shape == (2, 4, 3)
    with pytest.raises(TypeError, match=r"k_scale is the cache's own"):
        cache.attend(q, [a, b], k_scale=np.ones(1))


def test_fork_copy_on_write(rng):
    bs = 4
    cache = PagedKVCache(2, 8, block_size=bs)
    history = {}
    parent = cache.add_sequence()
    _append_random(rng, cache, history, [parent], [6])  # one full block + a half-filled one
    parent_k, parent_v = cache.gather(parent)
    used = cache.num_blocks_used
    child = cache.fork(parent)
    history[child] = history[parent]
    assert cache.num_blocks_used == used  # nothing copied yet
    _append_random(rng, cache, history, [child], [1])  # copies the shared half block, then writes
    assert cache.num_blocks_used == used + 1
    np.testing.assert_array_equal(cache.gather(parent)[0], parent_k)
    np.testing.assert_array_equal(cache.gather(parent)[1], parent_v)
    # The parent now owns its half block alone again: appending to it copies nothing.
    _append_random(rng, cache, history, [parent], [1])
    assert cache.num_blocks_used == used + 1
    np.testing.assert_array_equal(cache.gather(child)[0], history[child][0])
    # Forks of forks and long appends past the shared prefix.
    grandchild = cache.fork(child)
    history[grandchild] = history[child]
    _append_random(rng, cache, history, [grandchild, child, parent], [9, 2, 5])
    for s in (parent, child, grandchild):
        np.testing.assert_array_equal(cache.gather(s)[0], history[s][0])
        np.testing.assert_array_equal(cache.gather(s)[1], history[s][1])
    q = randn(rng, (3, 4, 1, 8))
    np.testing.assert_allclose(cache.attend(q, [parent, child, grandchild]),
                               _expected(q, history, [parent, child, grandchild]), **tol(np.float32))
    # Freeing the parent keeps the shared first block for the children.
    free_before = cache.num_free_blocks
    cache.free(parent)
    assert cache.num_free_blocks == free_before + 2  # its own half block and its own third block
    np.testing.assert_array_equal(cache.gather(grandchild)[0], history[grandchild][0])
    cache.free(child)
    cache.free(grandchild)
    assert cache.num_blocks_used == 0 and len(cache) == 0
    with pytest.raises(KeyError, match=r"seq_id=0 is not a live sequence"):
        cache.seq_len(parent)


def test_block_table_rows_follow_appends_forks_and_copies(rng):
    """block_table() rows are each sequence's block ids in token order, zero-padded, int32: across the growth
    of a sequence's id buffer (8 -> 16 -> 32 ids), a fork (shared ids) and a copy-on-write (new last id)."""
    cache = PagedKVCache(1, 4, block_size=2)
    history = {}
    a, b = cache.add_sequence(), cache.add_sequence()
    _append_random(rng, cache, history, [a, b], [41, 3])  # a: 21 blocks, the last half full
    child = cache.fork(a)
    history[child] = history[a]
    table, lens = cache.block_table([a, b, child])
    assert table.dtype == np.int32 and lens.dtype == np.int32 and table.shape == (3, 21)
    np.testing.assert_array_equal(lens, [41, 3, 41])
    np.testing.assert_array_equal(table[2], table[0])  # the fork shares every block
    assert not table[1, 2:].any() and len(set(table[0]) | set(table[1, :2])) == 23
    _append_random(rng, cache, history, [child], [1])  # copies the shared half block
    after, _ = cache.block_table([a, child])
    np.testing.assert_array_equal(after[0], table[0])
    np.testing.assert_array_equal(after[1, :20], table[0, :20])
    assert after[1, 20] not in set(table[0]) | set(table[1, :2])
    q = randn(rng, (3, 2, 1, 4))
    np.testing.assert_allclose(cache.attend(q, [a, b, child]), _expected(q, history, [a, b, child]), **tol(np.float32))


def test_fork_at_block_boundary_shares_everything(rng):
    cache = PagedKVCache(1, 4, block_size=4)
    history = {}
    s = cache.add_sequence()
    _append_random(rng, cache, history, [s], [8])
    t = cache.fork(s)
    history[t] = history[s]
    _append_random(rng, cache, history, [s, t], [1, 1])  # full shared blocks are never written: no copy
    assert cache.num_blocks_used == 4
    for x in (s, t):
        np.testing.assert_array_equal(cache.gather(x)[0], history[x][0])


def test_pool_grows_geometrically(rng):
    cache = PagedKVCache(1, 4, block_size=2)
    assert cache.num_blocks == 0
    history = {}
    s = cache.add_sequence()
    sizes = []
    for _ in range(40):
        _append_random(rng, cache, history, [s], [3])
        sizes.append(cache.num_blocks)
    growths = sorted(set(sizes))
    assert all(b >= 2 * a for a, b in zip(growths, growths[1:]))  # each growth at least doubles
    assert len(growths) <= 8 and cache.num_blocks_used == 60
    np.testing.assert_array_equal(cache.gather(s)[0], history[s][0])  # the data survives every growth
    assert cache.memory_bytes == cache.num_blocks * 2 * 1 * 8 * 4 and cache.used_bytes == 60 * 64


def test_fixed_pool_full(rng):
    cache = PagedKVCache(1, 4, block_size=4, num_blocks=3)
    history = {}
    a, b = cache.add_sequence(), cache.add_sequence()
    _append_random(rng, cache, history, [a, b], [5, 2])
    assert cache.num_free_blocks == 0 and cache.num_blocks == 3
    before = (cache.seq_len(a), cache.seq_len(b))
    with pytest.raises(ValueError, match=r"PagedKVCache pool is full: this append needs 1 new blocks of 4 tokens and "
                                         r"0 of the num_blocks=3 are free; free\(\) finished sequences"):
        _append_random(rng, cache, {}, [b, a], [2, 4])
    assert (cache.seq_len(a), cache.seq_len(b)) == before  # a failed append writes nothing
    _append_random(rng, cache, history, [b], [2])  # fills b's block: no new block needed
    cache.free(a)
    _append_random(rng, cache, history, [b], [8])
    np.testing.assert_array_equal(cache.gather(b)[0], history[b][0])


def test_append_errors(rng):
    cache = PagedKVCache(2, 4, value_dim=3, block_size=4)
    s = cache.add_sequence()
    k, v = np.zeros((2, 1, 4), np.float32), np.zeros((2, 1, 3), np.float32)
    with pytest.raises(TypeError, match=r"k for sequence 0 must have dtype float32 \(the cache's dtype\), got float64"):
        cache.append(s, k.astype(np.float64), v)
    with pytest.raises(ValueError, match=r"v for sequence 0 must have shape \(num_kv_heads=2, n, value_dim=3\), got \(2, 1, 4\)"):
        cache.append(s, k, k)
    with pytest.raises(ValueError, match=r"k and v for sequence 0 must hold the same number of tokens"):
        cache.append(s, k, np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"seq_ids must not repeat an id"):
        cache.append([s, s], [k, k], [v, v])
    with pytest.raises(ValueError, match=r"k must hold one array per sequence id \(1\), got 2"):
        cache.append([s], [k, k], [v])
    with pytest.raises(KeyError, match=r"seq_ids entry=5 is not a live sequence"):
        cache.append([5], [k], [v])
    with pytest.raises(TypeError, match=r"seq_id must be an int"):
        cache.fork("0")
    assert cache.seq_len(s) == 0
    with pytest.raises(TypeError, match=r"dtype must be float32, float64, float16, bfloat16 \(ml_dtypes\) or int8"):
        PagedKVCache(1, 4, dtype=np.int16)
    with pytest.raises(ValueError, match=r"block_size must be >= 1, got 0"):
        PagedKVCache(1, 4, block_size=0)
    with pytest.raises(ValueError, match=r"head_dim must be between 1 and"):
        PagedKVCache(1, 100000)


def test_int8_cache(rng):
    hkv, d, bs = 2, 32, 16
    cache = PagedKVCache(hkv, d, block_size=bs, dtype=np.int8)
    f32 = PagedKVCache(hkv, d, block_size=bs)
    history = {}
    ids = [cache.add_sequence() for _ in range(3)]
    assert [f32.add_sequence() for _ in range(3)] == ids
    for counts in ([5, 0, 40], [1, 1, 1], [1, 1, 1]):
        ks = [randn(rng, (hkv, n, d)) for n in counts]
        vs = [randn(rng, (hkv, n, d)) for n in counts]
        cache.append(ids, ks, vs)
        f32.append(ids, ks, vs)
        for s, k, v in zip(ids, ks, vs):
            old = history.get(s, (np.zeros((hkv, 0, d), np.float32),) * 2)
            history[s] = (np.concatenate([old[0], k], 1), np.concatenate([old[1], v], 1))
    for s in ids:
        k, v = cache.gather(s)  # dequantised: quantize_kv's codes times its scales
        for got, x in ((k, history[s][0]), (v, history[s][1])):
            codes, scale = quantize_kv(x)
            np.testing.assert_array_equal(got, codes * scale[..., None])
    q = randn(rng, (3, 8, 1, d))
    out = cache.attend(q, ids)
    table, lens = cache.block_table(ids)
    ref = ref_paged(q, cache.key_cache, cache.value_cache, table, lens, k_scale=cache.key_scales,
                    v_scale=cache.value_scales)[0]
    np.testing.assert_allclose(out, ref, **tol(np.float32))
    assert np.abs(out - f32.attend(q, ids)).max() < 0.05  # the bound is tested above; this is a sanity check
    # A quarter of float32's bytes, plus one float32 scale per token and head for each of K and V.
    assert cache.block_bytes == bs * hkv * (2 * d + 8) and f32.block_bytes == bs * hkv * 2 * d * 4
    with pytest.raises(ValueError, match=r"x must be finite"):
        cache.append(ids[0], np.full((hkv, 1, d), np.nan, np.float32), np.zeros((hkv, 1, d), np.float32))
    assert cache.seq_len(ids[0]) == 7  # the failed append wrote nothing


def test_attend_looks_up_attention_paged_at_call_time(rng, monkeypatch):
    cache = PagedKVCache(1, 4, block_size=2, dtype=np.int8)
    s = cache.add_sequence()
    cache.append(s, np.ones((1, 3, 4), np.float32), np.ones((1, 3, 4), np.float32))
    seen = {}

    def spy(q, key_cache, value_cache, block_table, seq_lens, **kwargs):
        seen.update(kwargs, key_cache=key_cache, block_table=block_table, seq_lens=seq_lens)
        return "sentinel"

    monkeypatch.setattr(fusedattn, "attention_paged", spy)
    assert cache.attend(np.ones((1, 2, 1, 4), np.float32), [s], sinks=np.zeros(2, np.float32)) == "sentinel"
    assert seen["key_cache"] is cache.key_cache and seen["k_scale"] is cache.key_scales  # the pool itself
    assert seen["block_table"].dtype == np.int32 and seen["seq_lens"].tolist() == [3]
    assert "sinks" in seen
