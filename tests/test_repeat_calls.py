"""Repeated plain calls reuse their validation (_spec._REPEATS): the spec of a repeat must be the spec the
full validation builds, results must not change, and every error must still be raised."""
import numpy as np
import pytest

import fusedattn
from fusedattn import _spec, reference

ml_dtypes = pytest.importorskip("ml_dtypes")


def _fresh_spec(*args, **kwargs):
    _spec._REPEATS.clear()
    return _spec.prepare_attention(*args, **kwargs)


def _assert_same_spec(repeat, fresh):
    assert set(repeat.__dict__) == set(fresh.__dict__)
    for name, value in fresh.__dict__.items():
        other = repeat.__dict__[name]
        if name == "user_call":
            assert set(other()) == set(value())
            for arg, given in value().items():
                assert other()[arg] is given or other()[arg] == given, arg
        elif isinstance(value, np.ndarray):
            assert other.shape == value.shape and other.dtype == value.dtype and other.strides == value.strides, name
            assert np.shares_memory(other, value) or np.array_equal(other, value), name
        else:
            assert other == value, name


CALLS = [
    dict(q=(1, 8, 1, 64), kv=(1, 2, 37, 64), dtype=np.float32, options=dict(causal="bottom_right")),
    dict(q=(2, 4, 3, 40), kv=(2, 4, 11, 40), dtype=np.float64, options=dict(causal=True, scale=0.3, q_start=2)),
    dict(q=(5, 16), kv=(9, 16), dtype=np.float32, options=dict(softcap=30.0, return_lse=True)),
    dict(q=(3, 2, 8), kv=(3, 7, 8), dtype=ml_dtypes.bfloat16, options=dict(causal="top_left", k_start=4)),
    dict(q=(1, 4, 2, 24), kv=(1, 4, 5, 24), dtype=np.float16, options=dict(precision="high", num_threads=1)),
    dict(q=(1, 2, 1, 32), kv=(1, 2, 6, 32), dtype=np.float32,  # NumPy scalars, as 1 / np.sqrt(D) gives
         options=dict(scale=1 / np.sqrt(32), q_start=np.int64(3), causal=np.True_)),
]


@pytest.mark.parametrize("call", CALLS, ids=lambda c: f"{len(c['q'])}d-{np.dtype(c['dtype']).name}-{sorted(c['options'])[0]}")
def test_repeat_spec_equals_full_validation(call):
    """Lk grows call after call (a decode loop): each repeat's spec is field for field the fresh one."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal(call["q"]).astype(call["dtype"])
    _spec._REPEATS.clear()
    for extra in (0, 1, 5, 0):
        shape = call["kv"][:-2] + (call["kv"][-2] + extra, call["kv"][-1])
        k, v = (rng.standard_normal(shape).astype(call["dtype"]) for _ in range(2))
        repeat = _spec.prepare_attention(q, k, v, **call["options"])
        assert _spec._REPEATS, "a plain call is kept"
        kept = dict(_spec._REPEATS)
        fresh = _fresh_spec(q, k, v, **call["options"])
        _spec._REPEATS.update(kept)
        _assert_same_spec(repeat, fresh)


def test_repeat_results_match_reference():
    """A decode loop through the kept validation: every step against the float64 reference (fp32 kernel vs
    float64, D = 64 and <= 40 keys: 2e-5 covers the rounding of the sums)."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 8, 1, 64)).astype(np.float32)
    k_all, v_all = (rng.standard_normal((1, 2, 40, 64)).astype(np.float32) for _ in range(2))
    _spec._REPEATS.clear()
    for length in range(1, 41, 3):
        k, v = k_all[:, :, :length], v_all[:, :, :length]
        got, lse = fusedattn.attention(q, k, v, causal="bottom_right", return_lse=True)
        want, want_lse = reference.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                                             causal="bottom_right", return_lse=True)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bad, error, match", [
    (dict(q_start=True), TypeError, "q_start must be an int"),   # True == 1: the kept key holds the types too
    (dict(causal=1), ValueError, "causal must be one of"),       # 1 == True
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(num_threads=0), ValueError, "num_threads must be >= 1"),
    (dict(dropout_p=1.5), ValueError, "dropout_p must be in"),
    (dict(q_start=np.bool_(True)), TypeError, "q_start must be an int"),
])
def test_repeat_keeps_every_error(bad, error, match):
    q = np.ones((1, 2, 1, 8), np.float32)
    k = v = np.ones((1, 2, 4, 8), np.float32)
    good = dict(q_start=1, causal=True, scale=0.5, num_threads=1, dropout_p=0.0)
    _spec._REPEATS.clear()
    fusedattn.attention(q, k, v, **good)
    fusedattn.attention(q, k, v, **good)
    with pytest.raises(error, match=match):
        fusedattn.attention(q, k, v, **{**good, **bad})


def test_repeat_refuses_mismatched_lengths_and_ranks():
    q = np.ones((1, 2, 1, 8), np.float32)
    k = v = np.ones((1, 2, 4, 8), np.float32)
    _spec._REPEATS.clear()
    fusedattn.attention(q, k, v)
    with pytest.raises(ValueError, match="k and v must agree"):
        fusedattn.attention(q, k, np.ones((1, 2, 5, 8), np.float32))
    with pytest.raises(ValueError, match="same number of dimensions"):
        fusedattn.attention(q, k, np.ones((2, 8), np.float32))


@pytest.mark.parametrize("mask", [True, np.True_, np.float64(0.0)], ids=["bool", "np.bool_", "np.float64"])
def test_scalar_masks_are_never_kept(mask):
    """A scalar mask is broadcast to each call's (Lq, Lk): calls with growing Lk must each get their own (found by
    the property test when NumPy scalars first qualified)."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 1, 8)).astype(np.float32)
    _spec._REPEATS.clear()
    for length in (3, 5, 2):
        k, v = (rng.standard_normal((1, 2, length, 8)).astype(np.float32) for _ in range(2))
        got = fusedattn.attention(q, k, v, mask=mask)
        want = reference.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), mask=mask)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)  # fp32 vs float64, <= 5 keys
    assert not _spec._REPEATS


def test_repeat_does_not_keep_arrays_or_random_dropout():
    """The kept fields hold no array of a call (no memory held), and dropout without a seed draws a new
    mask every call (never kept)."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 1, 4, 8)).astype(np.float32) for _ in range(3))
    _spec._REPEATS.clear()
    fusedattn.attention(q, k, v)
    ((template, _, _),) = _spec._REPEATS.values()
    assert template["q"] is None and template["k"] is None and template["v"] is None
    _spec._REPEATS.clear()
    first = fusedattn.attention(q, k, v, dropout_p=0.5)
    second = fusedattn.attention(q, k, v, dropout_p=0.5)
    assert not _spec._REPEATS
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("shape", [(1, 2, 1, 64), (3, 2, 16)], ids=["4d-gqa", "3d"])
def test_repeat_int8_spec_equals_full_validation(shape, monkeypatch):
    """int8 K / V with their scales, as KVCache(dtype=np.int8) passes them (views of longer buffers, Lk growing):
    each repeat's spec is the fresh one, scales included, and the kept fields hold no scale array."""
    repeats = []
    real_repeat = _spec._repeat
    monkeypatch.setattr(_spec, "_repeat", lambda *a, **kw: repeats.append(real_repeat(*a, **kw)) or repeats[-1])
    rng = np.random.default_rng(4)
    q = rng.standard_normal(shape[:-3] + (8,) + shape[-2:] if len(shape) == 4 else shape).astype(np.float32)
    lead = shape[:-3] + (shape[-3],) if len(shape) == 4 else shape[:-2]
    k_all, k_scale_all = fusedattn.quantize_kv(rng.standard_normal(lead + (40, shape[-1])))
    v_all, v_scale_all = fusedattn.quantize_kv(rng.standard_normal(lead + (40, shape[-1])))
    _spec._REPEATS.clear()
    for length in (5, 6, 11, 5):
        args = (q, k_all[..., :length, :], v_all[..., :length, :])
        scales = dict(k_scale=k_scale_all[..., :length], v_scale=v_scale_all[..., :length], causal="bottom_right")
        repeat = _spec.prepare_attention(*args, **scales)
        assert _spec._REPEATS, "an int8 call with float32 scales is kept"
        ((template, _, _),) = _spec._REPEATS.values()
        assert template["k_scale"] is None and template["v_scale"] is None
        kept = dict(_spec._REPEATS)
        _assert_same_spec(repeat, _fresh_spec(*args, **scales))
        _spec._REPEATS.update(kept)
    assert len(repeats) == 3 and all(spec is not None for spec in repeats)  # every call after the first


def test_repeat_int8_keeps_every_error_and_conversion():
    """After a kept int8 call: scales of another shape or missing are refused as by the full validation, float64
    scales are converted (the same result), and float K / V with scales are refused."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 4, 1, 16)).astype(np.float32)
    (k, ks), (v, vs) = (fusedattn.quantize_kv(rng.standard_normal((1, 2, 9, 16))) for _ in range(2))
    _spec._REPEATS.clear()
    first = fusedattn.attention(q, k, v, k_scale=ks, v_scale=vs)
    np.testing.assert_array_equal(fusedattn.attention(q, k, v, k_scale=ks, v_scale=vs), first)
    np.testing.assert_array_equal(fusedattn.attention(q, k, v, k_scale=ks.astype(np.float64), v_scale=vs), first)
    with pytest.raises(ValueError, match=r"v_scale must have shape \(1, 2, 9\)"):
        fusedattn.attention(q, k, v, k_scale=ks, v_scale=vs[..., :8])
    with pytest.raises(ValueError, match="int8 k and v need their per-token scales"):
        fusedattn.attention(q, k, v)
    with pytest.raises(ValueError, match="k_scale / v_scale are for int8 k and v"):
        fusedattn.attention(q, k.astype(np.float32), v.astype(np.float32), k_scale=ks, v_scale=vs)
    with pytest.raises(TypeError, match="v_scale must be a real"):
        fusedattn.attention(q, k, v, k_scale=ks, v_scale=vs.astype(np.complex64))


# --- attention_paged (_spec._PAGED_REPEATS) -------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.int8], ids=["f32", "int8"])
def test_paged_repeat_spec_equals_full_validation(dtype, monkeypatch):
    """A PagedKVCache decode loop (the table widens, the lengths grow, sequences fork): each repeat's spec is
    field for field the full validation's, and the kept fields hold none of a call's arrays."""
    from fusedattn.paged import PagedKVCache

    full = []  # the full validations of the loop's calls (not of the fresh specs they are compared with)
    real_check = fusedattn.paged.check_paged_args
    monkeypatch.setattr(fusedattn.paged, "check_paged_args", lambda *a, **kw: full.append(1) or real_check(*a, **kw))
    rng = np.random.default_rng(6)
    cache = PagedKVCache(2, 16, block_size=4, num_blocks=64, dtype=dtype)
    ids = [cache.add_sequence(), cache.add_sequence()]
    cache.append(ids, *([rng.standard_normal((2, n, 16), dtype=np.float32) for n in (3, 9)] for _ in "kv"))
    q = rng.standard_normal((2, 8, 1, 16)).astype(np.float32)
    _spec._PAGED_REPEATS.clear()
    for step in range(6):
        if step == 3:
            ids[1] = cache.fork(ids[0])
        cache.append(ids, *([rng.standard_normal((2, 1, 16), dtype=np.float32) for _ in ids] for _ in "kv"))
        table, lens = cache.block_table(ids)
        scales = dict(k_scale=cache.key_scales, v_scale=cache.value_scales) if dtype == np.int8 else {}
        args = (q, cache.key_cache, cache.value_cache, table, lens)
        full_before = len(full)
        repeat = _spec.prepare_paged(*args, causal="bottom_right", scale=0.25, **scales)
        assert len(full) - full_before == (1 if step == 0 else 0), step
        ((template),) = _spec._PAGED_REPEATS.values()
        for name in ("q", "k", "v", "k_scale", "v_scale", "block_table", "seq_lens"):
            assert template[name] is None, name
        kept = dict(_spec._PAGED_REPEATS)
        _spec._PAGED_REPEATS.clear()
        _assert_same_spec(repeat, _spec.prepare_paged(*args, causal="bottom_right", scale=0.25, **scales))
        _spec._PAGED_REPEATS.clear()
        _spec._PAGED_REPEATS.update(kept)


def test_paged_repeat_keeps_every_error():
    """After a kept paged call, every wrong table, length, scale or option is refused as by the full validation."""
    rng = np.random.default_rng(7)
    kc, vc = (rng.integers(-127, 128, (6, 4, 2, 8)).astype(np.int8) for _ in "kv")
    ks, vs = (rng.random((6, 4, 2)).astype(np.float32) for _ in "kv")
    q = rng.standard_normal((2, 4, 1, 8)).astype(np.float32)
    table, lens = np.array([[5, 1, 0], [2, 0, 0]], np.int32), np.array([9, 3], np.int32)
    good = dict(k_scale=ks, v_scale=vs)
    _spec._PAGED_REPEATS.clear()
    first = fusedattn.attention_paged(q, kc, vc, table, lens, **good)
    np.testing.assert_array_equal(fusedattn.attention_paged(q, kc, vc, table, lens, **good), first)
    assert _spec._PAGED_REPEATS
    cases = [
        (dict(block_table=np.array([[5, 7, 0], [2, 0, 0]], np.int32)), ValueError,
         r"block_table\[0, 1\] = 7 is not a block of the pool"),
        (dict(seq_lens=np.array([9, -1], np.int32)), ValueError, r"seq_lens must be >= 0, got seq_lens\[1\] = -1"),
        (dict(seq_lens=np.array([13, 3], np.int32)), ValueError, r"seq_lens\[0\] = 13 exceeds"),
        (dict(block_table=table.astype(np.float32)), TypeError, "block_table must be an integer array"),
        (dict(block_table=table[:1]), ValueError, "block_table must have one row per sequence"),
        (dict(seq_lens=lens[:1]), ValueError, r"seq_lens must have shape \(B,\) = \(2,\)"),
        (dict(k_scale=ks[:, :3]), ValueError, r"k_scale must have shape \(num_blocks, block_size, Hkv\)"),
        (dict(v_scale=vs.astype(np.float64)), TypeError, "v_scale must have dtype float32"),
        (dict(k_scale=None, v_scale=None), ValueError, "int8 caches need their per-token scales"),
        (dict(num_threads=0), ValueError, "num_threads must be >= 1"),
        (dict(causal=True), ValueError, "causal must be 'bottom_right' or False"),
    ]
    for change, error, match in cases:
        call = dict(block_table=table, seq_lens=lens, **good)
        call.update(change)
        with pytest.raises(error, match=match):
            fusedattn.attention_paged(q, kc, vc, **call)
    np.testing.assert_array_equal(fusedattn.attention_paged(q, kc, vc, table, lens, **good), first)


def test_repeat_with_sinks(monkeypatch):
    """gpt-oss decoding passes its sinks every step: dense and paged repeats keep their validation with sinks,
    check the sinks' values each call, and convert or refuse anything else as the full validation does."""
    from fusedattn.paged import PagedKVCache

    full = []
    real_dense, real_paged = _spec._prepare_core, fusedattn.paged.check_paged_args
    monkeypatch.setattr(_spec, "_prepare_core", lambda *a, **kw: full.append("dense") or real_dense(*a, **kw))
    monkeypatch.setattr(fusedattn.paged, "check_paged_args", lambda *a, **kw: full.append("paged") or real_paged(*a, **kw))
    rng = np.random.default_rng(8)
    q = rng.standard_normal((1, 4, 1, 16)).astype(np.float32)
    sinks = rng.standard_normal(4).astype(np.float32)
    k_all, v_all = (rng.standard_normal((1, 2, 20, 16)).astype(np.float32) for _ in "kv")
    cache = PagedKVCache(2, 16, block_size=4)
    seq = cache.add_sequence()
    _spec._REPEATS.clear()
    _spec._PAGED_REPEATS.clear()
    for length in (3, 4, 9):
        k, v = k_all[:, :, :length], v_all[:, :, :length]
        cache.append(seq, k[0, :, cache.seq_len(seq):], v[0, :, cache.seq_len(seq):])
        dense = fusedattn.attention(q, k, v, causal="bottom_right", sinks=sinks)
        paged = cache.attend(q, [seq], sinks=sinks)
        want = reference.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                                   causal="bottom_right", sinks=sinks.astype(np.float64))
        np.testing.assert_allclose(dense, want, atol=2e-5, rtol=2e-5)  # fp32 vs float64, <= 9 keys
        np.testing.assert_allclose(paged, want, atol=2e-5, rtol=2e-5)
    assert full == ["dense", "paged"]  # the second and third steps took the kept paths
    k, v = k_all[:, :, :9], v_all[:, :, :9]
    table, lens = cache.block_table([seq])
    pool = (cache.key_cache, cache.value_cache, table, lens)
    for bad, error, match in [(np.array([0.0, np.nan, 0.0, 0.0], np.float32), ValueError, "sinks must be finite"),
                              (sinks[:3], ValueError, r"sinks must have shape \(Hq,\) = \(4,\)")]:
        with pytest.raises(error, match=match):
            fusedattn.attention(q, k, v, causal="bottom_right", sinks=bad)
        with pytest.raises(error, match=match):
            fusedattn.attention_paged(q, *pool, sinks=bad)
    # float64 or strided sinks are converted by the full validation: the same results
    for other in (sinks.astype(np.float64), np.repeat(sinks, 2)[::2]):
        np.testing.assert_array_equal(fusedattn.attention(q, k, v, causal="bottom_right", sinks=other), dense)
        np.testing.assert_array_equal(fusedattn.attention_paged(q, *pool, sinks=other), paged)
