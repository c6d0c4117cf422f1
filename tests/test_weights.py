"""fusedattn.attention_weights: probabilities against the reference and against attention() itself."""
import numpy as np
import pytest

import fusedattn
from fusedattn import reference

from conftest import assert_close, make_qkv, randn


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lq, lk, d", [(1, 1, 8), (7, 777, 40), (777, 7, 96), (65, 64, 128)])
def test_dot_weights_match_reference(isa, rng, dtype, lq, lk, d):
    q, k, _ = make_qkv(rng, lq=lq, lk=lk, d=d, batch=(1,), hq=2, hkv=1, dtype=dtype)
    w = fusedattn.attention_weights(q, k)
    assert w.shape == (1, 2, lq, lk) and w.dtype == np.dtype(dtype)
    assert_close(w, reference.attention_weights(q, k))
    assert_close(w.sum(-1), np.ones((1, 2, lq), dtype))


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("kind", ["dot", "additive"])
def test_weights_times_values_is_attention(isa, rng, causal, kind):
    q, k, v = make_qkv(rng, lq=70, lk=90, d=16, batch=(2,), hq=4, hkv=2)
    mask = rng.random((70, 90)) > 0.2
    w = fusedattn.attention_weights(q, k, mask=mask, causal=causal, kind=kind)
    fused = (fusedattn.attention(q, k, v, mask=mask, causal=causal) if kind == "dot"
             else fusedattn.additive_attention(q, k, v, mask=mask, causal=causal))
    # weights @ v (with kv heads repeated for the query-head groups) must give the fused output.
    np.testing.assert_allclose(w @ np.repeat(v, 2, axis=1), fused, rtol=1e-4, atol=1e-5)
    assert_close(w, reference.attention_weights(q, k, mask=mask, causal=causal, kind=kind))


def test_fully_masked_rows_are_zero_and_other_rows_sum_to_one(isa, rng):
    q, k, _ = make_qkv(rng, lq=5, lk=8, d=4, batch=(), hq=None)
    mask = np.ones((5, 8), bool)
    mask[3] = False
    w = fusedattn.attention_weights(q, k, mask=mask)
    assert np.all(w[3] == 0)
    assert_close(np.delete(w, 3, axis=0).sum(-1), np.ones(4, np.float32))
    # bottom-right causal with Lq > Lk leaves the first Lq - Lk rows with no key at all
    w = fusedattn.attention_weights(q, k[:3], causal="bottom_right")
    assert np.all(w[:2] == 0)
    assert_close(w, reference.attention_weights(q, k[:3], causal="bottom_right"))


def test_additive_weights_with_score_weight_and_scale(isa, rng):
    q, k, _ = make_qkv(rng, lq=9, lk=11, d=6, batch=(3,), hq=None)
    sw = randn(rng, (6,))
    assert_close(fusedattn.attention_weights(q, k, kind="additive", score_weight=sw),
                 reference.attention_weights(q, k, kind="additive", score_weight=sw))
    assert_close(fusedattn.attention_weights(q, k, scale=0.3), reference.attention_weights(q, k, scale=0.3))


# The reference takes valid inputs only (issue #14): errors are the public function's, which validates
# before computing. Without the extension these pass once the fallback is routed through validation.
@pytest.mark.parametrize("fn", [fusedattn.attention_weights])
def test_errors(fn):
    q = k = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="kind"):
        fn(q, k, kind="cosine")
    with pytest.raises(ValueError, match="score_weight"):
        fn(q, k, score_weight=np.ones(4, np.float32))
    with pytest.raises(ValueError, match="k"):
        fn(q, np.ones((3, 5), np.float32))
