"""Shared fixtures and oracles for the fusedattn test suite.

Two ways of judging a result against the float64 NumPy reference (``fusedattn.reference``):

* Plain tolerances (:func:`assert_close`), for ordinary, well-conditioned inputs
  (standard-normal q/k/v, so scaled scores are O(1)):

  - float32: ``atol = rtol = 2e-5``. The kernel accumulates in float32: every score is a length-D dot
    product and every output a length-Lk weighted sum, each step rounding with eps32 ~ 6e-8. The
    rounding errors grow like sqrt(n) * eps for such random sums (n <= 777 keys, D <= 512 here),
    so outputs of size O(1) carry errors of a few 1e-7; a naive float32 NumPy implementation
    measures ~5e-7 at D=512, Lk=777. 2e-5 leaves ~40x headroom for a different summation order,
    FMA contraction and a polynomial exp, yet still catches any real bug (a wrong key, a mask
    off by one, a missing rescale all move outputs by >= 1e-3).
  - float64: ``atol = rtol = 1e-12``. The same argument with eps64 ~ 1.1e-16 gives errors ~1e-14;
    1e-12 leaves ~100x headroom.

* A *relative oracle* (:func:`assert_relative_oracle`) for inputs whose conditioning makes any fixed
  tolerance wrong, e.g. huge scores (|q.k| ~ 1e4: the float32 rounding of the score alone is
  ~1e4 * 6e-8 ~ 1e-3, which the softmax turns into output errors of the same order), or
  HF-style ``finfo.min`` masks. There the only fair yardstick is how well *the same precision* can
  do at all: we compute a naive, textbook implementation in the inputs' own dtype with NumPy
  (materialised scores, max-subtracted softmax), measure its error against the float64 truth on the
  *same* inputs, and require the kernel's error to be at most 2x that, plus a small absolute floor.
  The 2x allows a different (tiled, online-softmax) evaluation order, whose error is of the same
  order but not identical; the floor (a few ulps of the output's magnitude) covers cases where the
  naive version happens to be exact (e.g. Lk = 1, where the output is v itself) while a correct
  kernel may still be off by an ulp or two through its exp approximation or rescaling.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

import fusedattn
from fusedattn import _backend, reference

# ---------------------------------------------------------------------------------------------
# ISA fixture
# ---------------------------------------------------------------------------------------------

ISA_PREFERENCE = ("avx512", "avx2", "scalar")  # best first


def _isa_params():
    if _backend._core is None:
        return [pytest.param("reference", id="no-extension",
                             marks=pytest.mark.skip(reason="fusedattn's compiled extension is not importable"))]
    compiled = list(_backend._core.compiled_isas())
    supported = set(_backend.available_isas())
    params = []
    for name in compiled:
        if name in supported:
            params.append(pytest.param(name, id=name))
        else:
            params.append(pytest.param(
                name, id=name,
                marks=pytest.mark.skip(reason=f"ISA {name!r} is compiled into this build but not supported by this CPU"),
            ))
    # Anything reported as supported but (inconsistently) not compiled still gets tested.
    for name in sorted(supported - set(compiled)):
        params.append(pytest.param(name, id=name))
    return params


ISA_PARAMS = _isa_params()


@pytest.fixture(params=ISA_PARAMS)
def isa(request):
    """Run the test with each ISA path forced in turn; the previous selection is restored afterwards."""
    previous = _backend.force_isa(request.param)
    try:
        assert fusedattn.backend_info()["isa"] == request.param
        yield request.param
    finally:
        _backend.force_isa(previous)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's node id: reproducible, but different for every test/param."""
    seed = sum(request.node.nodeid.encode()) * 7919 + len(request.node.nodeid)
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# Input construction
# ---------------------------------------------------------------------------------------------

def randn(rng, shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def make_qkv(rng, lq=16, lk=None, d=32, dv=None, *, batch=(2,), hq=4, hkv=None, dtype=np.float32, scale=1.0):
    """Standard-normal q (batch..., hq, lq, d), k (batch..., hkv, lk, d), v (batch..., hkv, lk, dv).

    ``batch=()`` with ``hq=None`` gives 2-D (L, D) inputs; ``hq=None`` gives 3-D (B, L, D) inputs.
    """
    lk = lq if lk is None else lk
    dv = d if dv is None else dv
    hkv = hq if hkv is None else hkv
    heads_q = () if hq is None else (hq,)
    heads_kv = () if hkv is None else (hkv,)
    batch = tuple(batch)
    q = randn(rng, batch + heads_q + (lq, d), dtype, scale)
    k = randn(rng, batch + heads_kv + (lk, d), dtype, scale)
    v = randn(rng, batch + heads_kv + (lk, dv), dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------
# Plain-tolerance comparison
# ---------------------------------------------------------------------------------------------

# See the module docstring for the reasoning behind these numbers.
TOL = {
    np.dtype(np.float32): dict(atol=2e-5, rtol=2e-5),
    np.dtype(np.float64): dict(atol=1e-12, rtol=1e-12),
}


def tol(dtype):
    return TOL[np.dtype(dtype)]


def assert_close(actual, expected, err_msg=""):
    """assert_allclose with the dtype's tolerance; NaN must match NaN and +-inf must match exactly."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, err_msg)
    np.testing.assert_allclose(actual, expected, equal_nan=True, err_msg=err_msg, **tol(expected.dtype))


def check_attention(q, k, v, *, oracle="plain", **kwargs):
    """Run the kernel (with and without return_lse) and compare out and lse with the reference.

    Also checks dtypes and shapes, and that rows which attend nothing (reference lse == -inf) give
    exactly 0 and exactly -inf. ``oracle`` is "plain" (fixed tolerances), "relative" (see
    :func:`assert_relative_oracle`) or "both". Returns (out, lse) from the kernel.
    """
    out, lse = fusedattn.attention(q, k, v, return_lse=True, **kwargs)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **kwargs)
    dtype = np.asarray(q).dtype
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
    assert out.dtype == dtype and lse.dtype == dtype
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    if oracle in ("plain", "both"):
        assert_close(out, ref_out, "out")
        assert_close(lse, ref_lse, "lse")
    if oracle in ("relative", "both"):
        assert_relative_oracle(out, lse, q, k, v, **kwargs)
    assert_dead_rows(out, lse, ref_lse)
    # The output without return_lse is the same computation.
    out_only = fusedattn.attention(q, k, v, **kwargs)
    assert out_only.dtype == dtype and out_only.shape == out.shape
    np.testing.assert_allclose(out_only, out, equal_nan=True, **tol(dtype))
    return out, lse


def assert_dead_rows(out, lse, ref_lse):
    """Rows with no key to attend to: output exactly 0 and lse exactly -inf."""
    dead = np.isneginf(ref_lse)
    if dead.any():
        assert np.all(out[dead] == 0.0), "a fully-masked row must give exactly 0"
        assert np.all(np.isneginf(lse[dead])), "a fully-masked row must give lse == -inf"
    live = ~dead & ~np.isnan(ref_lse)
    assert not np.isneginf(lse[live]).any(), "a row that attends some key must not report lse == -inf"


# ---------------------------------------------------------------------------------------------
# Relative oracle
# ---------------------------------------------------------------------------------------------

def _expand_heads(x, rank):
    """Give 2-D (L, D) / 3-D (B, L, D) arrays (and their masks) an explicit head axis."""
    if rank == 2:
        return x[np.newaxis]
    if rank == 3:
        return np.expand_dims(x, 1)
    return x


def _mask_in_dtype(mask, dtype):
    """The kernel sees a float mask converted to the inputs' dtype (bool masks unchanged)."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    return mask if mask.dtype == np.bool_ else mask.astype(dtype)


def exact_f64(q, k, v, *, mask=None, causal=False, scale=None):
    """Float64 truth for the given (possibly float32) inputs: the reference run on float64 copies.

    The float mask is first rounded to the inputs' dtype, exactly as the kernel receives it, so the
    truth is for the very numbers the kernel saw.
    """
    dtype = np.asarray(q).dtype
    m = _mask_in_dtype(mask, dtype)
    if m is not None and m.dtype != np.bool_:
        m = m.astype(np.float64)
    return reference.attention(np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(v, np.float64),
                               mask=m, causal=causal, scale=scale, return_lse=True)


def naive_same_precision(q, k, v, *, mask=None, causal=False, scale=None):
    """Textbook attention evaluated entirely in the inputs' dtype (NaN for fully-masked rows)."""
    q, k, v = (np.asarray(x) for x in (q, k, v))
    dtype = q.dtype
    rank = q.ndim
    qh, kh, vh = (_expand_heads(x, rank) for x in (q, k, v))
    hq, lq, d = qh.shape[-3:]
    hkv, lk, _ = kh.shape[-3:]
    group = hq // hkv
    kh = np.repeat(kh, group, axis=-3)
    vh = np.repeat(vh, group, axis=-3)
    scale = dtype.type(1.0 / math.sqrt(d) if scale is None else scale)
    s = (qh @ np.swapaxes(kh, -1, -2)) * scale
    m = _mask_in_dtype(mask, dtype)
    if m is not None:
        m = _expand_heads(np.broadcast_to(m, q.shape[:-1] + (lk,)), rank)
        s = np.where(m, s, dtype.type(-np.inf)) if m.dtype == np.bool_ else s + m
    if causal is not False:
        offset = 0 if causal in (True, "top_left") else lk - lq
        allowed = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + offset
        s = np.where(allowed, s, dtype.type(-np.inf))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mx = s.max(axis=-1, keepdims=True) if lk else np.full(s.shape[:-1] + (1,), -np.inf, dtype)
        e = np.exp(s - mx)
        z = e.sum(axis=-1, keepdims=True)
        out = (e @ vh) / z
        lse = (mx + np.log(z))[..., 0]
    return out.reshape(q.shape[:-1] + (v.shape[-1],)).astype(dtype), lse.reshape(q.shape[:-1]).astype(dtype)


def _max_err(a, b, where):
    if not where.any():
        return 0.0
    return float(np.max(np.abs(a.astype(np.float64)[where] - b[where])))


def assert_relative_oracle(out, lse, q, k, v, *, mask=None, causal=False, scale=None, factor=2.0, **_ignored):
    """Kernel error vs float64 truth <= factor * (naive same-precision error) + floor.

    Compared only where the truth is finite (fully-masked rows and NaN rows are checked exactly
    elsewhere). The floor is 8 ulps of the largest |output| (resp. |lse|, at least 1): enough for
    the last-bit differences of a correct kernel where the naive version happens to be exact.
    """
    true_out, true_lse = exact_f64(q, k, v, mask=mask, causal=causal, scale=scale)
    naive_out, naive_lse = naive_same_precision(q, k, v, mask=mask, causal=causal, scale=scale)
    eps = float(np.finfo(np.asarray(q).dtype).eps)
    for name, got, true, naive in (("out", out, true_out, naive_out), ("lse", lse, true_lse, naive_lse)):
        finite = np.isfinite(true)
        assert np.array_equal(np.isfinite(got), finite), f"{name}: non-finite values where the truth is finite (or vice versa)"
        magnitude = float(np.max(np.abs(true[finite]))) if finite.any() else 0.0
        floor = 8 * eps * max(1.0, magnitude)
        naive_ok = finite & np.isfinite(naive)
        err_kernel = _max_err(got, true, finite)
        err_naive = _max_err(naive, true, naive_ok)
        assert err_kernel <= factor * err_naive + floor, (
            f"{name}: kernel max error {err_kernel:.3e} exceeds {factor} x naive same-precision error "
            f"{err_naive:.3e} + floor {floor:.3e}"
        )


# ---------------------------------------------------------------------------------------------
# Subprocess helpers (for tests that need a fresh interpreter)
# ---------------------------------------------------------------------------------------------

def subprocess_env(**overrides):
    """The current environment, with fusedattn importable exactly as in this process."""
    env = dict(os.environ)
    env.pop("FUSEDATTN_ISA", None)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fusedattn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


PYTHON = sys.executable
