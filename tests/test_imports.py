"""What `import fusedattn` loads: the optional dependencies and heavy submodules wait until a call needs them."""
from __future__ import annotations

import json
import subprocess

import pytest

import fusedattn
from conftest import PYTHON, subprocess_env

LAZY = ("ml_dtypes", "matplotlib", "dask", "fusedattn.cuda", "fusedattn.dask", "fusedattn.plot", "fusedattn.cli",
        "importlib.metadata")


def _loaded_after(code: str) -> dict:
    script = code + "\nimport json, sys\nprint(json.dumps({name: name in sys.modules for name in %r}))" % (LAZY,)
    proc = subprocess.run([PYTHON, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_plain_import_loads_no_optional_module():
    loaded = _loaded_after("import numpy as np, fusedattn\nfusedattn.attention(*(np.ones((1, 4, 8), np.float32),) * 3)")
    if not fusedattn.backend_info()["extension"]:
        loaded.pop("importlib.metadata")  # the fallback reads its version from the installed metadata
    assert not any(loaded.values()), [name for name, on in loaded.items() if on]


def test_bfloat16_is_recognised_without_importing_ml_dtypes_first():
    pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes")
    # The user's own import of ml_dtypes is the first; fusedattn names bfloat16 by its dtype name.
    code = ("import numpy as np, fusedattn, ml_dtypes\n"
            "x = np.ones((1, 4, 8), ml_dtypes.bfloat16)\n"
            "assert fusedattn.attention(x, x, x).dtype == x.dtype")
    assert _loaded_after(code)["ml_dtypes"]


@pytest.mark.parametrize("name", ["plot", "dask", "cuda", "cli"])
def test_submodules_are_attributes(name):
    assert name in dir(fusedattn)
    if name == "dask":
        pytest.importorskip("dask", reason="fusedattn.dask needs dask: pip install 'fusedattn[dask]'")
    module = getattr(fusedattn, name)
    assert module.__name__ == f"fusedattn.{name}"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        fusedattn.no_such_name  # noqa: B018
