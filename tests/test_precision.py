"""float32 precision modes: ``precision="highest" | "high" | "medium"`` (torch.set_float32_matmul_precision's words).

"high" and "medium" put float32 ``Q @ K^T`` and ``P @ V`` on the AMX tiles (bf16x3 and bf16) on the amx level
and are ignored everywhere else. The amx level runs here on the exact software model of the tile
instructions (``_backend.set_amx_emulation(1)``), so these tests check the AMX arithmetic on any AVX-512 CPU;
on a CPU with AMX the hardware gives the same bits.

Bounds, for unit-normal q, k, v (scaled scores O(1)) against the float64 reference:

* "high" <= 5e-5. bf16x3 splits each fp32 operand into hi + lo bfloat16 (8 + 8 significant bits, so ~16
  bits: 2^-16 ~ 1.5e-5 relative per operand; the dropped lo.lo product is below that too). A score is a
  sum of D such products and an output a convex combination of values, so errors stay of that order:
  measured 4e-6 to 1.8e-5 (1x8x512x512, D=64, four seeds, causal or not). 5e-5 leaves ~3x headroom, and is
  still ~50x below "medium", so it shows the bf16x3 split is really done.
* "medium" <= 3e-2. One bfloat16 per operand keeps 8 significant bits: 2^-9 ~ 2e-3 relative per operand;
  measured 2e-3 to 1.1e-2 on the same inputs (causal rows that see few keys average less of it away).
* "medium" must be strictly worse than "high": proof that the mode was taken, not ignored.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess

import numpy as np
import pytest

import fusedattn
from conftest import PYTHON, make_qkv, subprocess_env
from fusedattn import _backend, reference
from fusedattn.kv_cache import KVCache
from fusedattn.layers import MultiHeadAttention

core = _backend._core
MODES = ("highest", "high", "medium")
HIGH_ATOL = 5e-5    # see the module docstring
MEDIUM_ATOL = 3e-2
AMX_STATUS_KEYS = {"compiled", "cpu", "cpu_fp16", "native_fp16", "os", "emulated", "reason"}

needs_extension = pytest.mark.skipif(core is None, reason="fusedattn's compiled extension is not importable")
needs_amx_model = pytest.mark.skipif(
    core is None or "amx" not in core.compiled_isas() or "avx512" not in core.supported_isas(),
    reason="needs the extension with the amx level compiled in, and the avx512 level its software model runs on")


@contextlib.contextmanager
def amx_emulation(mode):
    """``_backend.set_amx_emulation(mode)`` for the block; the previous mode and ISA are restored after."""
    previous_isa, previous_mode = core.current_isa(), core.amx_status()["emulated"]
    _backend.set_amx_emulation(mode)
    try:
        yield
    finally:
        _backend.set_amx_emulation(previous_mode)
        if previous_isa in _backend.available_isas():
            _backend.force_isa(previous_isa)


@contextlib.contextmanager
def on_amx_model():
    with amx_emulation(1):
        _backend.force_isa("amx")
        assert fusedattn.backend_info()["isa"] == "amx"
        yield


@pytest.fixture(autouse=True)
def state_is_restored():
    """No test here may leave the software model on or another ISA selected for the tests after it."""
    before = None if core is None else (core.current_isa(), core.amx_status()["emulated"])
    yield
    if core is not None:
        assert (core.current_isa(), core.amx_status()["emulated"]) == before


def max_error(out, ref) -> float:
    return float(np.abs(out.astype(np.float64) - ref).max())


def f64(*arrays):
    return tuple(np.asarray(a, np.float64) for a in arrays)


# ---------------------------------------------------------------------------------------------
# The entry points: each call gets precision= only when the test passes one (``**precision``)
# ---------------------------------------------------------------------------------------------

def _attention(rng, **precision):
    q, k, v = make_qkv(rng, 48, 70, 64, batch=(1,), hq=4, hkv=2)
    return fusedattn.attention(q, k, v, causal=True, **precision)


def _varlen(rng, **precision):
    cu = np.array([0, 21, 21, 70])  # an empty sequence in the middle
    q, k, v = (rng.standard_normal((70, 2, 32)).astype(np.float32) for _ in range(3))
    return fusedattn.attention_varlen(q, k, v, cu, cu, causal=True, **precision)


def _mha_constructor(rng, **precision):
    x = rng.standard_normal((2, 20, 32)).astype(np.float32)
    return MultiHeadAttention(32, 2, rng=0, **precision)(x)[0]


def _mha_call(rng, **precision):
    x = rng.standard_normal((2, 20, 32)).astype(np.float32)
    return MultiHeadAttention(32, 2, rng=0)(x, **precision)[0]


def _kv_cache(rng, **precision):
    cache = KVCache(1, 2, max_len=64, head_dim=16)
    cache.append(*(rng.standard_normal((1, 2, 40, 16)).astype(np.float32) for _ in "kv"))
    return cache.attend(rng.standard_normal((1, 4, 20, 16)).astype(np.float32), **precision)


ENTRY_POINTS = [pytest.param(_attention, id="attention"), pytest.param(_varlen, id="attention_varlen"),
                pytest.param(_mha_constructor, id="MultiHeadAttention"), pytest.param(_mha_call, id="mha_call"),
                pytest.param(_kv_cache, id="KVCache.attend")]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("value,exc,match", [
    ("fast", ValueError, r"precision must be 'highest', 'high' or 'medium'.*got 'fast'"),
    ("HIGH", ValueError, r"precision.*got 'HIGH'"),
    ("", ValueError, r"precision.*got ''"),
    (1, TypeError, r"precision must be a str.*got int 1"),
    (b"high", TypeError, r"precision must be a str.*got bytes"),
])
def test_bad_precision(entry, value, exc, match):
    with pytest.raises(exc, match=match):
        entry(np.random.default_rng(0), precision=value)


@pytest.mark.parametrize("entry", [p for p in ENTRY_POINTS if p.id != "mha_call"])  # None there: the layer's
def test_none_is_not_a_precision(entry):
    with pytest.raises(TypeError, match=r"precision must be a str.*NoneType"):
        entry(np.random.default_rng(0), precision=None)


def test_mha_precision_is_stored_and_overridden_per_call():
    mha = MultiHeadAttention(16, 2, rng=0, precision="medium")
    assert mha.precision == "medium"
    assert "precision='medium'" in repr(mha) and "precision" not in repr(MultiHeadAttention(16, 2, rng=0))
    x = np.ones((1, 3, 16), np.float32)
    assert mha(x, precision="high")[0].shape == (1, 3, 16)
    mha.precision = "fast"  # a bad stored value is caught by the next call that uses it
    with pytest.raises(ValueError, match="got 'fast'"):
        mha(x)
    assert mha._cache is None  # the failed call left nothing for backward()


@needs_extension
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_modes_on_every_isa(entry, isa):
    """No precision = "highest", bit for bit, everywhere; "high" / "medium" change float32 results on amx only."""
    outs = {mode: entry(np.random.default_rng(1), precision=mode) for mode in MODES}
    assert np.array_equal(entry(np.random.default_rng(1)), outs["highest"])
    if fusedattn.backend_info()["isa"] == "amx":
        assert not np.array_equal(outs["high"], outs["highest"])
        assert not np.array_equal(outs["medium"], outs["high"])
    else:
        for mode in ("high", "medium"):
            assert np.array_equal(outs[mode], outs["highest"]), f"{mode!r} differs from 'highest' off the amx level"


@needs_extension
@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_other_dtypes_ignore_precision(dtype, isa):
    """Only float32 reads the mode: float64 and 16-bit inputs run the same path whatever it says."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    q, k, v = make_qkv(np.random.default_rng(2), 40, 56, 32, batch=(1,), hq=2, dtype=dtype)
    outs = [fusedattn.attention(q, k, v, causal=True, precision=mode) for mode in MODES]
    for mode, out in zip(MODES[1:], outs[1:]):
        assert np.array_equal(out.view(np.uint8), outs[0].view(np.uint8)), f"{dtype}: {mode!r} changed the result"


# ---------------------------------------------------------------------------------------------
# Accuracy on the amx level (the software model)
# ---------------------------------------------------------------------------------------------

def check_mode_errors(run, ref):
    """``run(precision)`` against ``ref`` for each mode: the bounds of the module docstring."""
    errors = {mode: max_error(run(mode), ref) for mode in MODES}
    assert errors["highest"] < 2e-5, errors  # conftest's float32 tolerance: the fp32 FMA path is untouched
    assert errors["high"] <= HIGH_ATOL, errors
    assert errors["medium"] <= MEDIUM_ATOL, errors
    assert errors["medium"] > errors["high"], errors
    return errors


@needs_amx_model
@pytest.mark.parametrize("causal", [False, True])
def test_attention_accuracy_on_amx(causal):
    rng = np.random.default_rng(3)
    q, k, v = make_qkv(rng, 257, 300, 64, batch=(1,), hq=4, hkv=2)  # awkward lengths: partial tiles
    ref = reference.attention(*f64(q, k, v), causal=causal)
    with on_amx_model():
        check_mode_errors(lambda mode: fusedattn.attention(q, k, v, causal=causal, precision=mode), ref)


@needs_amx_model
def test_attention_varlen_accuracy_on_amx():
    rng = np.random.default_rng(4)
    cu = np.array([0, 100, 137, 337])
    q, k, v = (rng.standard_normal((337, 4, 64)).astype(np.float32) for _ in range(3))
    ref = reference.attention_varlen(*f64(q, k, v), cu, cu, causal=True)
    with on_amx_model():
        check_mode_errors(lambda mode: fusedattn.attention_varlen(q, k, v, cu, cu, causal=True, precision=mode), ref)


@needs_amx_model
def test_multi_head_attention_accuracy_on_amx():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 160, 128)).astype(np.float32)
    layer64 = MultiHeadAttention(128, 2, dtype=np.float64, rng=0)  # head_dim 64, as the other tests
    ref, _ = layer64(x.astype(np.float64), causal=True)
    with on_amx_model():
        layers = {mode: MultiHeadAttention(128, 2, rng=0, precision=mode) for mode in MODES}
        for layer in layers.values():
            layer.load_state_dict(layer64.state_dict())
        check_mode_errors(lambda mode: layers[mode](x, causal=True)[0], ref)
        # The per-call argument overrides the layer's: "medium" on a "highest" layer is the "medium" layer.
        assert np.array_equal(layers["highest"](x, causal=True, precision="medium")[0],
                              layers["medium"](x, causal=True)[0])
        layers["medium"].backward(np.ones((2, 160, 128), np.float32))  # the backward is unaffected, and runs


@needs_amx_model
def test_kv_cache_accuracy_on_amx():
    rng = np.random.default_rng(6)
    cache = KVCache(1, 2, max_len=512, head_dim=64)
    cache.append(*(rng.standard_normal((1, 2, 300, 64)).astype(np.float32) for _ in "kv"))
    q = rng.standard_normal((1, 4, 32, 64)).astype(np.float32)  # a prefill chunk: Lq > 4 takes the tiles
    ref = reference.attention(*f64(q, cache.keys, cache.values), causal="bottom_right")
    with on_amx_model():
        check_mode_errors(lambda mode: cache.attend(q, precision=mode), ref)
        # A decoding step (Lq <= 4) stays on vectors: every mode is the fp32 path there.
        step = q[:, :, :1]
        assert all(np.array_equal(cache.attend(step, precision=mode), cache.attend(step)) for mode in MODES)


# ---------------------------------------------------------------------------------------------
# backend_info, the switches, and the environment
# ---------------------------------------------------------------------------------------------

FP32_ON_AMX = {"highest": "fp32 FMA", "high": "bf16x3 on AMX tiles", "medium": "bf16 on AMX tiles"}
FP32_ELSEWHERE = {"highest": "fp32 FMA", "high": "fp32 FMA (no AMX: runs as 'highest')",
                  "medium": "fp32 FMA (no AMX: runs as 'highest')"}


@needs_extension
def test_backend_info_amx_and_precision():
    info = fusedattn.backend_info()
    assert set(info["amx"]) == AMX_STATUS_KEYS and info["amx"] == core.amx_status()
    assert isinstance(info["amx"]["reason"], str)
    assert all(isinstance(info["amx"][key], bool) for key in ("compiled", "cpu", "cpu_fp16", "native_fp16", "os"))
    assert info["float32_precision"] == (FP32_ON_AMX if info["isa"] == "amx" else FP32_ELSEWHERE)


@needs_amx_model
def test_backend_info_in_both_states():
    with amx_emulation(0):
        info = fusedattn.backend_info()
        assert info["amx"]["emulated"] == 0
        available = "amx" in info["supported_isas"]
        assert (info["amx"]["reason"] == "") == available, info["amx"]  # a reason exactly when unavailable
        assert available == (info["amx"]["cpu"] and info["amx"]["os"])
        if info["isa"] != "amx":
            assert info["float32_precision"] == FP32_ELSEWHERE
    with on_amx_model():
        info = fusedattn.backend_info()
        assert info["amx"]["emulated"] == 1 and info["amx"]["reason"] == "" and "amx" in info["supported_isas"]
        assert info["float32_precision"] == FP32_ON_AMX
        _backend.force_isa("avx512")  # the model is on, but another level is selected
        assert fusedattn.backend_info()["float32_precision"] == FP32_ELSEWHERE


@needs_extension
@pytest.mark.parametrize("mode,exc", [(3, ValueError), (-1, ValueError), ("1", TypeError), (True, TypeError)])
def test_set_amx_emulation_rejects(mode, exc):
    with pytest.raises(exc, match="mode"):
        _backend.set_amx_emulation(mode)


def _run_python(code, **env):
    return subprocess.run([PYTHON, "-c", code], env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.abspath(__file__)) + "/..")


REPORT = ("import json, numpy as np, fusedattn\n"
          "q = np.random.default_rng(0).standard_normal((1, 2, 64, 64)).astype(np.float32)\n"
          "same = bool(np.array_equal(fusedattn.attention(q, q, q, precision='medium'), fusedattn.attention(q, q, q)))\n"
          "info = fusedattn.backend_info()\n"
          "print(json.dumps({'isa': info['isa'], 'amx': info['amx'], 'medium_is_highest': same}))\n")


@needs_amx_model
def test_env_var_runs_the_model():
    # Applied before FUSEDATTN_ISA, so FUSEDATTN_ISA=amx works on a CPU without AMX.
    proc = _run_python(REPORT, FUSEDATTN_AMX_EMULATION="1", FUSEDATTN_ISA="amx")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["isa"] == "amx" and result["amx"]["emulated"] == 1 and result["amx"]["reason"] == ""
    assert result["medium_is_highest"] is False


@needs_extension
@pytest.mark.parametrize("value", ["", "0", " 0 "])
def test_env_var_off(value):
    proc = _run_python(REPORT, FUSEDATTN_AMX_EMULATION=value)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["amx"]["emulated"] == 0
    assert result["medium_is_highest"] is (result["isa"] != "amx")


@pytest.mark.parametrize("value", ["3", "yes", "on", "1.0"])
def test_env_var_rejects(value):
    proc = _run_python(REPORT, FUSEDATTN_AMX_EMULATION=value)
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and "FUSEDATTN_AMX_EMULATION" in proc.stderr and repr(value) in proc.stderr


def test_fallback_validates_and_ignores_precision():
    """Without the extension: precision is still validated, then ignored (the reference is float64 inside)."""
    from test_fallback import BLOCKERS
    code = "import sys\n" + BLOCKERS["sys_modules_none"] + (
        "import json, warnings, numpy as np\n"
        "warnings.simplefilter('ignore')\n"
        "import fusedattn\n"
        "q = np.random.default_rng(0).standard_normal((1, 2, 16, 8)).astype(np.float32)\n"
        "same = bool(np.array_equal(fusedattn.attention(q, q, q, precision='medium'), fusedattn.attention(q, q, q)))\n"
        "try:\n"
        "    fusedattn.attention(q, q, q, precision='fast'); error = None\n"
        "except ValueError as exc:\n"
        "    error = str(exc)\n"
        "info = fusedattn.backend_info()\n"
        "print(json.dumps({'same': same, 'error': error, 'amx': info['amx'], 'fp32': info['float32_precision']}))\n")
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["same"] is True and "got 'fast'" in result["error"]
    assert result["amx"]["compiled"] is False and result["amx"]["cpu"] is False and result["amx"]["os"] is False
    assert result["amx"]["reason"] == "the compiled extension is not available"
    assert set(result["fp32"]) == set(MODES)
