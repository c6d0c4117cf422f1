"""Without the compiled extension, fusedattn warns once and falls back to the NumPy reference.

Each test runs a fresh interpreter in which ``fusedattn._core`` cannot be imported, and reports
what it saw as JSON.
"""
from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from conftest import PYTHON, subprocess_env

BLOCKERS = {
    # A meta-path finder that refuses the extension, as a missing or broken build would.
    "meta_path": textwrap.dedent("""
        import importlib.abc
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "fusedattn._core":
                    raise ImportError("blocked by the test: simulated missing build")
                return None
        sys.meta_path.insert(0, _Block())
    """),
    # sys.modules[name] = None makes any import of it raise ImportError.
    "sys_modules_none": textwrap.dedent("""
        sys.modules["fusedattn._core"] = None
    """),
}

CHECK = textwrap.dedent("""
    import json, warnings
    import numpy as np
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fusedattn
        from fusedattn import _backend, reference
        rng = np.random.default_rng(0)
        q = rng.standard_normal((2, 4, 9, 16)).astype(np.float32)
        k = rng.standard_normal((2, 2, 13, 16)).astype(np.float32)
        v = rng.standard_normal((2, 2, 13, 8)).astype(np.float32)
        mask = rng.random((9, 13)) < 0.7
        mask[3] = False
        kwargs = dict(mask=mask, causal="bottom_right", scale=0.4)
        out, lse = fusedattn.attention(q, k, v, return_lse=True, num_threads=2, **kwargs)
        ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **kwargs)
        buf = np.empty_like(ref_out)
        same_out = fusedattn.attention(q, k, v, out=buf, **kwargs) is buf
        errors = {}
        for name, call in (("force_isa", lambda: _backend.force_isa("scalar")),
                           ("bad_causal", lambda: fusedattn.attention(q, k, v, causal="x")),
                           ("bad_threads", lambda: fusedattn.attention(q, k, v, num_threads=0))):
            try:
                call()
                errors[name] = None
            except Exception as exc:
                errors[name] = type(exc).__name__
        info = fusedattn.backend_info()
    print(json.dumps({
        "warnings": [[w.category.__name__, str(w.message)] for w in caught],
        "have_extension": _backend.HAVE_EXTENSION,
        "available_isas": _backend.available_isas(),
        "info": info,
        "out_equal": bool(np.array_equal(out, ref_out)),
        "lse_equal": bool(np.array_equal(lse, ref_lse)),
        "buf_equal": bool(np.array_equal(buf, ref_out)),
        "same_out": same_out,
        "dead_row": bool(np.all(out[:, :, 3] == 0) and np.all(np.isneginf(lse[:, :, 3]))),
        "dtype": str(out.dtype),
        "errors": errors,
    }))
""")


@pytest.mark.parametrize("blocker", list(BLOCKERS))
def test_fallback_without_extension(blocker):
    code = "import sys\n" + BLOCKERS[blocker] + CHECK
    proc = subprocess.run([PYTHON, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)

    # Exactly one warning in all: a RuntimeWarning at import that says why and what happens now.
    assert len(result["warnings"]) == 1, result["warnings"]
    category, message = result["warnings"][0]
    assert category == "RuntimeWarning"
    assert "compiled extension could not be imported" in message
    assert "fusedattn._core" in message or "blocked by the test" in message
    assert "reference" in message  # says it falls back to the reference implementation

    assert result["have_extension"] is False
    assert result["available_isas"] == []
    assert result["info"]["extension"] is False and result["info"]["isa"] == "reference"
    # attention still works, and is the reference.
    assert result["out_equal"] and result["lse_equal"] and result["dtype"] == "float32"
    assert result["same_out"] and result["buf_equal"]
    assert result["dead_row"]
    # Validation still applies; force_isa explains there is nothing to select.
    assert result["errors"] == {"force_isa": "RuntimeError", "bad_causal": "ValueError", "bad_threads": "ValueError"}


def test_fallback_reason_is_in_message():
    # The warning carries the ImportError's own text, so a user can see what went wrong.
    code = "import sys\n" + BLOCKERS["meta_path"] + CHECK
    proc = subprocess.run([PYTHON, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (category, message), = json.loads(proc.stdout)["warnings"]
    assert "simulated missing build" in message
