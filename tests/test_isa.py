"""ISA dispatch: backend_info(), the default choice, force_isa, and the FUSEDATTN_ISA variable."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

import fusedattn
from conftest import ISA_PREFERENCE, PYTHON, assert_close, level_of, make_qkv, subprocess_env
from fusedattn import _backend, reference

KNOWN_ISAS = {"scalar", "avx2", "avx512", "avx512bf16", "amx"}
# CPU flags each path needs, from the compile flags in CMakeLists.txt.
ISA_CPU_FLAGS = {
    "avx2": {"avx2", "fma"},
    "avx512": {"avx512f", "avx512dq", "avx512vl", "avx512bw", "avx2", "fma"},
    "avx512bf16": {"avx512_bf16", "avx512f", "avx512dq", "avx512vl", "avx512bw", "avx2", "fma"},
}
# amx also needs the OS to grant the tile state, which no CPU flag shows: a CPU without these flags must not
# list it; one with them lists it exactly when backend_info()["amx"]["os"] says the grant came.
AMX_CPU_FLAGS = {"amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx512dq", "avx512vl", "avx512bw"}

REPORT_SCRIPT = (
    "import json, fusedattn; print(json.dumps(fusedattn.backend_info()))"
)


def _run_python(code, **env):
    return subprocess.run([PYTHON, "-c", code], env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.abspath(__file__)) + "/..")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_extension_is_built():
    # Everything else in this suite tests the compiled kernel: fail loudly if it is missing.
    assert _backend.HAVE_EXTENSION, "fusedattn._core could not be imported: the suite would only test the fallback"
    assert fusedattn.backend_info()["extension"] is True


def test_backend_info_keys_and_types():
    info = fusedattn.backend_info()
    assert set(info) == {"isa", "compiled_isas", "supported_isas", "num_threads", "openmp", "version", "cuda",
                         "extension", "amx", "float32_precision", "decode_read_ahead"}
    assert isinstance(info["decode_read_ahead"], bool)
    assert {"cpu", "os", "reason"} <= set(info["amx"])
    assert isinstance(info["amx"]["reason"], str)
    assert isinstance(info["isa"], str)
    assert isinstance(info["compiled_isas"], list) and all(isinstance(x, str) for x in info["compiled_isas"])
    assert isinstance(info["supported_isas"], list) and all(isinstance(x, str) for x in info["supported_isas"])
    assert isinstance(info["num_threads"], int) and not isinstance(info["num_threads"], bool)
    assert info["num_threads"] >= 1
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["version"], str) and info["version"]
    assert isinstance(info["cuda"], dict) and set(info["cuda"]) == {"built", "devices", "error"}  # tests/test_cuda.py
    assert isinstance(info["extension"], bool)


def test_backend_info_consistency():
    info = fusedattn.backend_info()
    assert "scalar" in info["compiled_isas"] and "scalar" in info["supported_isas"]
    assert set(info["compiled_isas"]) <= KNOWN_ISAS
    assert set(info["supported_isas"]) <= set(info["compiled_isas"])
    assert info["isa"] in info["supported_isas"]
    assert _backend.available_isas() == info["supported_isas"]
    assert len(set(info["compiled_isas"])) == len(info["compiled_isas"])
    if not info["openmp"]:
        assert info["num_threads"] == 1
    assert info["version"] == fusedattn.__version__


def test_supported_isas_match_cpu_flags():
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo on this platform")
    info = fusedattn.backend_info()
    for isa, needed in ISA_CPU_FLAGS.items():
        if isa not in info["compiled_isas"]:
            continue
        cpu_has = needed <= flags
        assert (isa in info["supported_isas"]) == cpu_has, (
            f"{isa}: the CPU {'has' if cpu_has else 'lacks'} {sorted(needed)}, "
            f"but supported_isas = {info['supported_isas']}"
        )
    if "amx" in info["compiled_isas"] and not info["amx"]["emulated"]:
        granted = AMX_CPU_FLAGS <= flags and info["amx"]["os"]
        assert ("amx" in info["supported_isas"]) == granted, info["amx"]
        assert info["amx"]["cpu"] == ({"amx_tile", "amx_bf16"} <= flags)
        assert (info["amx"]["reason"] == "") == granted, info["amx"]


def _best(supported):
    return next(isa for isa in ISA_PREFERENCE if isa in supported)


def test_default_isa_is_best_supported():
    # A fresh interpreter without FUSEDATTN_ISA picks the best path the CPU supports.
    proc = _run_python(REPORT_SCRIPT, FUSEDATTN_ISA=None)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["isa"] == _best(info["supported_isas"])
    # An empty variable means "not set".
    proc = _run_python(REPORT_SCRIPT, FUSEDATTN_ISA="")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["isa"] == _best(info["supported_isas"])


def test_default_isa_in_this_process():
    if os.environ.get("FUSEDATTN_ISA"):
        pytest.skip("FUSEDATTN_ISA is set for this test run")
    info = fusedattn.backend_info()
    assert info["isa"] == _best(info["supported_isas"])


def test_force_isa_changes_backend_info():
    original = fusedattn.backend_info()["isa"]
    try:
        previous = original
        for name in _backend.available_isas():
            returned = _backend.force_isa(name)
            assert returned == previous
            assert fusedattn.backend_info()["isa"] == name
            previous = name
    finally:
        _backend.force_isa(original)
    assert fusedattn.backend_info()["isa"] == original


def test_force_isa_rejects_unknown():
    before = fusedattn.backend_info()["isa"]
    with pytest.raises(ValueError, match="bogus"):
        _backend.force_isa("bogus")
    assert fusedattn.backend_info()["isa"] == before


def test_force_isa_rejects_unsupported():
    info = fusedattn.backend_info()
    unsupported = [x for x in info["compiled_isas"] if x not in info["supported_isas"]]
    if not unsupported:
        pytest.skip("every compiled ISA is supported by this CPU")
    with pytest.raises(ValueError, match="not supported"):
        _backend.force_isa(unsupported[0])
    assert fusedattn.backend_info()["isa"] == info["isa"]


def test_forced_isa_is_used(isa):
    # Each path gives reference results (the fixture has forced it); the paths agree closely.
    rng = np.random.default_rng(99)
    q, k, v = make_qkv(rng, 40, 70, 64, batch=(1,), hq=2)
    assert fusedattn.backend_info()["isa"] == level_of(isa)
    assert_close(fusedattn.attention(q, k, v, causal=True), reference.attention(q, k, v, causal=True))


def _compiled_isa_params():
    info = fusedattn.backend_info()
    return [pytest.param(name, id=name,
                         marks=() if name in info["supported_isas"] else
                         pytest.mark.skip(reason=f"ISA {name!r} is compiled but not supported by this CPU"))
            for name in info["compiled_isas"]]


@pytest.mark.parametrize("name", _compiled_isa_params())
def test_env_var_selects_isa(name):
    code = (
        "import json, numpy as np, fusedattn\n"
        "from fusedattn import reference\n"
        "rng = np.random.default_rng(0)\n"
        "q, k, v = (rng.standard_normal((1, 2, 9, 16)) for _ in range(3))\n"
        "err = float(np.abs(fusedattn.attention(q, k, v) - reference.attention(q, k, v)).max())\n"
        "print(json.dumps({'isa': fusedattn.backend_info()['isa'], 'err': err}))\n"
    )
    proc = _run_python(code, FUSEDATTN_ISA=name)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["isa"] == name
    assert result["err"] < 1e-12  # float64 inputs: see conftest.TOL


@pytest.mark.parametrize("value", ["bogus", "avx1024", "sse9"])
def test_env_var_rejects_unknown_isa(value):
    proc = _run_python(REPORT_SCRIPT, FUSEDATTN_ISA=value)
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr
    assert "FUSEDATTN_ISA" in proc.stderr
    assert value in proc.stderr


def test_env_var_rejects_unsupported_isa():
    info = fusedattn.backend_info()
    unsupported = [x for x in info["compiled_isas"] if x not in info["supported_isas"]]
    if not unsupported:
        pytest.skip("every compiled ISA is supported by this CPU")
    proc = _run_python(REPORT_SCRIPT, FUSEDATTN_ISA=unsupported[0])
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and "FUSEDATTN_ISA" in proc.stderr and "not supported" in proc.stderr


def test_amx_unavailable_is_explained():
    info = fusedattn.backend_info()
    if "amx" not in info["compiled_isas"]:
        pytest.skip("the amx level is not compiled into this build")
    if "amx" in info["supported_isas"]:
        pytest.skip("this CPU and OS run the amx level")
    assert info["amx"]["reason"], info["amx"]
    with pytest.raises(ValueError, match="amx") as error:
        _backend.force_isa("amx")
    assert info["amx"]["reason"] in str(error.value)
    proc = _run_python(REPORT_SCRIPT, FUSEDATTN_ISA="amx")
    assert proc.returncode != 0 and "FUSEDATTN_ISA" in proc.stderr and info["amx"]["reason"] in proc.stderr


@pytest.mark.parametrize("value", ["0", "1"])
def test_env_var_sets_decode_read_ahead(value):
    proc = _run_python(REPORT_SCRIPT, FUSEDATTN_DECODE_READ_AHEAD=value)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["decode_read_ahead"] is (value == "1")


def test_env_var_rejects_bad_decode_read_ahead():
    proc = _run_python(REPORT_SCRIPT, FUSEDATTN_DECODE_READ_AHEAD="yes")
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and "FUSEDATTN_DECODE_READ_AHEAD" in proc.stderr and "'yes'" in proc.stderr
