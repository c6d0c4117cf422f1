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
  (materialised scores, max-subtracted softmax), measure its error against the truth on the *same*
  inputs (float64 for float32 inputs; long double for float64 inputs, since a float64 "truth" is no
  better than a float64 kernel), and require the kernel's error to be at most 2x that, plus a small
  floor. The 2x allows a different (tiled, online-softmax, exp2-based) evaluation order, whose error
  is of the same order but not identical; the floor covers inputs on which the naive version
  happens to be exact (e.g. Lk = 1, where the output is v itself). Errors are compared after
  dividing each by its condition (how far rounding can move that element): raw maximum errors are
  dominated by a single near-tie row and vary 30x between equally correct implementations (see
  assert_relative_oracle).
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

ISA_PREFERENCE = ("amx", "avx512bf16", "avx512", "avx2", "scalar")  # best first
# The amx level on the exact software model of the tile instructions (_core.set_amx_emulation): the whole
# AMX code path, on any CPU that runs the avx512 level. Where the CPU has AMX, "amx" runs the tiles too.
AMX_MODEL = "amx-model"


def amx_model_available() -> bool:
    core = _backend._core
    return core is not None and "amx" in core.compiled_isas() and "avx512" in core.supported_isas()


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
    if "amx" in compiled:
        params.append(pytest.param(AMX_MODEL, id=AMX_MODEL, marks=() if amx_model_available() else pytest.mark.skip(
            reason="the AMX software model runs on the avx512 level, which this CPU lacks")))
    return params


ISA_PARAMS = _isa_params()


def level_of(isa: str) -> str:
    """The ISA level a fixture value selects ("amx-model" is the amx level on the software model)."""
    return "amx" if isa == AMX_MODEL else isa


class amx_emulation:
    """Context manager: the amx level on the software model (mode 1; 2 models AMX-FP16 too), restored after."""

    def __init__(self, mode: int = 1):
        self.mode = mode

    def __enter__(self):
        self.previous_isa = _backend._core.current_isa()
        self.previous_mode = _backend._core.amx_status()["emulated"]
        _backend._core.set_amx_emulation(self.mode)
        _backend.force_isa("amx")
        return self

    def __exit__(self, *exc):
        _backend._core.set_amx_emulation(self.previous_mode)
        if self.previous_isa in _backend.available_isas():
            _backend.force_isa(self.previous_isa)
        return False


@pytest.fixture(params=ISA_PARAMS)
def isa(request):
    """Run the test with each ISA path forced in turn; the previous selection is restored afterwards."""
    if request.param == AMX_MODEL:
        with amx_emulation():
            assert fusedattn.backend_info()["isa"] == "amx"
            yield request.param
        return
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
def numeric_gradients(loss, arrays, h):
    """Central-difference gradient (step ``h``) of ``loss(*arrays)`` with respect to every element of every
    array, in float64."""
    arrays = [np.array(a, dtype=np.float64) for a in arrays]  # private copies, perturbed in place
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            saved = a[idx]
            a[idx] = saved + h
            plus = loss(*arrays)
            a[idx] = saved - h
            minus = loss(*arrays)
            a[idx] = saved
            g[idx] = (plus - minus) / (2 * h)
        grads.append(g)
    return grads


def _half_dtype_params():
    dtypes = [pytest.param(np.float16, id="f16")]
    try:
        import ml_dtypes

        dtypes.append(pytest.param(ml_dtypes.bfloat16, id="bf16"))
    except ImportError:
        dtypes.append(pytest.param(None, id="bf16", marks=pytest.mark.skip(reason="bfloat16 needs ml_dtypes")))
    return dtypes


# float16 and (where ml_dtypes is installed) bfloat16, for @pytest.mark.parametrize("dtype", ...).
HALF_DTYPE_PARAMS = _half_dtype_params()


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

def expand_heads(x, rank):
    """The kernel's (..., H, L, ...) view of a rank-2 (L, D) / rank-3 (B, L, D) user array (or mask)."""
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
    """Float64 result for the given (possibly float32) inputs: the reference run on float64 copies.

    The float mask is first rounded to the inputs' dtype, exactly as the kernel receives it, so this
    is the result for the very numbers the kernel saw.
    """
    dtype = np.asarray(q).dtype
    m = _mask_in_dtype(mask, dtype)
    if m is not None and m.dtype != np.bool_:
        m = m.astype(np.float64)
    return reference.attention(np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(v, np.float64),
                               mask=m, causal=causal, scale=scale, return_lse=True)


# x86's 80-bit long double has a 64-bit mantissa (eps ~1e-19): a truth for float64 inputs that is
# ~2000x more precise than float64 itself. Where long double is just double, no such truth exists.
LONGDOUBLE_IS_EXTENDED = np.finfo(np.longdouble).eps < np.finfo(np.float64).eps


def exact(q, k, v, *, mask=None, causal=False, scale=None):
    """The truth for judging a result computed in the inputs' precision.

    float32 inputs: float64 is ~1e9x more precise, so the float64 reference is the truth. float64
    inputs: the float64 reference is no more precise than the kernel itself, so the truth is the
    textbook formula evaluated in long double (rows that attend nothing, which the textbook formula
    turns into NaN, are taken from the reference: 0 and -inf). Returns None when no truth more
    precise than the inputs is available.
    """
    dtype = np.asarray(q).dtype
    ref_out, ref_lse = exact_f64(q, k, v, mask=mask, causal=causal, scale=scale)
    if dtype == np.float32:
        return ref_out, ref_lse
    if not LONGDOUBLE_IS_EXTENDED:
        return None
    out, lse = _textbook(q, k, v, mask=mask, causal=causal, scale=scale, compute=np.longdouble)
    dead = np.isneginf(ref_lse)
    return (np.where(dead[..., None], ref_out.astype(np.longdouble), out),
            np.where(dead, ref_lse.astype(np.longdouble), lse))


def naive_same_precision(q, k, v, *, mask=None, causal=False, scale=None):
    """Textbook attention evaluated entirely in the inputs' dtype (NaN for fully-masked rows)."""
    return _textbook(q, k, v, mask=mask, causal=causal, scale=scale, compute=np.asarray(q).dtype)


def _scores(q, k, v, *, mask, causal, scale, compute):
    """Scores ``q k^T * scale (+ float mask)`` with -inf where masked, in the (..., Hq, Lq, Lk) layout.

    Every operation in ``compute``. Also returns the heads-layout q, k, v (kv heads repeated for GQA),
    the scale in ``compute`` and |float mask| (0 where the mask is -inf or absent).
    """
    q, k, v = (np.asarray(x) for x in (q, k, v))
    dtype = q.dtype
    compute = np.dtype(compute)
    rank = q.ndim
    qh, kh, vh = (expand_heads(x, rank).astype(compute) for x in (q, k, v))
    hq, lq, d = qh.shape[-3:]
    hkv, lk, _ = kh.shape[-3:]
    group = hq // hkv
    kh = np.repeat(kh, group, axis=-3)
    vh = np.repeat(vh, group, axis=-3)
    scale = compute.type(1.0 / math.sqrt(d) if scale is None else float(scale))
    s = (qh @ np.swapaxes(kh, -1, -2)) * scale
    mask_abs = np.zeros((), compute)
    m = _mask_in_dtype(mask, dtype)
    if m is not None:
        m = expand_heads(np.broadcast_to(m, q.shape[:-1] + (lk,)), rank)
        if m.dtype == np.bool_:
            s = np.where(m, s, compute.type(-np.inf))
        else:
            m = m.astype(compute)
            s = s + m
            mask_abs = np.where(np.isfinite(m), np.abs(m), 0)
    if causal is not False:
        offset = 0 if causal in (True, "top_left") else lk - lq
        allowed = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + offset
        s = np.where(allowed, s, compute.type(-np.inf))
    return s, qh, kh, vh, scale, mask_abs


def _textbook(q, k, v, *, mask, causal, scale, compute):
    """softmax(q k^T * scale + mask) v with materialised scores, every operation in ``compute``."""
    s, _, _, vh, _, _ = _scores(q, k, v, mask=mask, causal=causal, scale=scale, compute=compute)
    compute = np.dtype(compute)
    lk = s.shape[-1]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mx = s.max(axis=-1, keepdims=True) if lk else np.full(s.shape[:-1] + (1,), -np.inf, compute)
        e = np.exp(s - mx)
        z = e.sum(axis=-1, keepdims=True)
        out = (e @ vh) / z
        lse = (mx + np.log(z))[..., 0]
    q = np.asarray(q)
    return out.reshape(q.shape[:-1] + (np.shape(v)[-1],)), lse.reshape(q.shape[:-1])


def _condition(q, k, v, true_out, true_lse, *, mask, causal, scale):
    """First-order sensitivity of out and lse to rounding at unit roundoff 1 (a float64 estimate).

    A score s_j = scale * sum_d q_d k_jd (+ m_j) carries a rounding error proportional to
    A_j = |scale| * sum_d |q_d k_jd| + |m_j| + 1 (the magnitudes summed, plus 1 for the relative
    error of exp and of the normalisation). Through the softmax, an error ds_j moves the output by
    w_j (v_j - out) ds_j and lse by w_j ds_j; the products w_j v_j are summed again with their own
    rounding. So, with the true weights w_j:
        cond_out[c] = sum_j w_j A_j |v_jc - out_c| + sum_j w_j |v_jc| + |out_c|
        cond_lse    = sum_j w_j A_j + |lse| + 1
    (|v_jc - out_c|, not |v_jc| + |out_c|: a row dominated by one key is insensitive to its scores.)
    """
    s, qh, kh, vh, sc, mask_abs = _scores(q, k, v, mask=mask, causal=causal, scale=scale, compute=np.float64)
    a = abs(float(sc)) * (np.abs(qh) @ np.swapaxes(np.abs(kh), -1, -2)) + mask_abs + 1.0
    lse = np.asarray(true_lse, np.float64).reshape(s.shape[:-1])
    live = np.isfinite(lse)[..., None]
    with np.errstate(invalid="ignore", over="ignore"):
        w = np.where(live & np.isfinite(s), np.exp(np.where(live, s - np.where(live, lse[..., None], 0), -np.inf)), 0.0)
    wa = w * a
    lq, lk, dv = s.shape[-2], s.shape[-1], vh.shape[-1]
    out = np.asarray(true_out, np.float64).reshape(s.shape[:-1] + (dv,))
    # sum_j wa_j |v_jc - out_c|, a few query rows at a time to bound the (rows, Lk, Dv) temporary.
    n = int(np.prod(s.shape[:-2]))
    wa3, v3, o3 = wa.reshape(n, lq, lk), np.broadcast_to(vh, s.shape[:-2] + (lk, dv)).reshape(n, lk, dv), out.reshape(n, lq, dv)
    spread = np.empty((n, lq, dv))
    rows = max(1, (1 << 22) // max(1, n * lk * dv))
    for r0 in range(0, lq, rows):
        r1 = min(lq, r0 + rows)
        diff = np.abs(v3[:, None, :, :] - o3[:, r0:r1, None, :])
        spread[:, r0:r1] = np.einsum("nrj,nrjc->nrc", wa3[:, r0:r1], diff)
    cond_out = spread.reshape(out.shape) + w @ np.abs(vh) + np.abs(out)
    cond_lse = wa.sum(-1) + np.abs(np.where(np.isfinite(lse), lse, 0)) + 1.0
    q = np.asarray(q)
    return cond_out.reshape(q.shape[:-1] + (np.shape(v)[-1],)), cond_lse.reshape(q.shape[:-1])


# Allowance of the relative oracle, in units of eps * condition (see assert_relative_oracle).
# Measured on ~1700 random and huge-score inputs (D = 1..512, Lk up to 777, masks, causal, every
# ISA, both dtypes): at most ~2.4 for the kernel and ~2 for the naive implementation, the kernel
# within 1.3x of naive on each configuration. An error of 8 ulps in every output already scores
# ~15-20, a lossy exp or a lower working precision scores in the hundreds.
RELATIVE_ORACLE_FLOOR = 4.0


def _scaled_err(a, true, cond, where):
    if not where.any():
        return 0.0
    err = np.abs(a[where].astype(true.dtype) - true[where]).astype(np.float64)
    # Rows that attend nothing have condition 0 and must be exact (0 / tiny = 0, anything else huge).
    return float(np.max(err / np.maximum(cond[where], np.finfo(np.float64).tiny)))


def assert_relative_oracle(out, lse, q, k, v, *, mask=None, causal=False, scale=None, factor=2.0, **_ignored):
    """The kernel is at most ``factor`` x less accurate than naive same-precision NumPy, plus a floor.

    Errors are measured against the truth (:func:`exact`), where it is finite (fully-masked and NaN
    rows are checked exactly elsewhere). Why not simply compare max absolute errors: where scores are
    huge, the error of out is dominated by the one row whose top two scores nearly tie, where it is
    w (1 - w) |v1 - v2| times the *rounding luck* of that score difference. Two equally correct
    implementations then differ by 30x in either direction from seed to seed (measured: ratios
    0.03 .. 34, median ~0.9). So each element's error is first divided by eps times its condition
    (:func:`_condition`: how much rounding at that magnitude can move it), which removes the
    conditioning and leaves "how many roundings' worth" of error: the kernel's largest must be
    <= factor x the naive implementation's largest + RELATIVE_ORACLE_FLOOR. The floor covers inputs
    on which the naive implementation happens to be exact (Lk = 1: the output is v itself).
    Without a truth more precise than the inputs (float64 where long double is double), only the
    pattern of finite values is checked; the plain tolerances still apply.
    """
    dtype = np.asarray(q).dtype
    ref_out, ref_lse = exact_f64(q, k, v, mask=mask, causal=causal, scale=scale)
    truth = exact(q, k, v, mask=mask, causal=causal, scale=scale)
    naive_out, naive_lse = naive_same_precision(q, k, v, mask=mask, causal=causal, scale=scale)
    cond = None
    if truth is not None:
        cond = _condition(q, k, v, truth[0], truth[1], mask=mask, causal=causal, scale=scale)
    eps = float(np.finfo(dtype).eps)
    for i, (name, got, naive, ref) in enumerate((("out", out, naive_out, ref_out), ("lse", lse, naive_lse, ref_lse))):
        finite = np.isfinite(ref)
        assert np.array_equal(np.isfinite(got), finite), f"{name}: non-finite values where the truth is finite (or vice versa)"
        if truth is None:
            continue
        err_kernel = _scaled_err(got, truth[i], cond[i], finite) / eps
        err_naive = _scaled_err(naive, truth[i], cond[i], finite & np.isfinite(naive)) / eps
        assert err_kernel <= factor * err_naive + RELATIVE_ORACLE_FLOOR, (
            f"{name}: kernel error {err_kernel:.3g} x eps x condition exceeds {factor} x the naive same-precision "
            f"error ({err_naive:.3g}) + {RELATIVE_ORACLE_FLOOR}"
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

