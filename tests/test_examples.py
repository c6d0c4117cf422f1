"""The examples run end to end (each in a fresh interpreter, in a temporary directory), and
fusedattn.plot.attention_map draws what it is given.

The examples are run with ``-W error``, like the test suite, and with and without matplotlib (a stub
package on PYTHONPATH that fails to import stands in for an installation without the [plot] extra).
Their printed numbers are checked for substance (accuracy, alignments, errors); never their timings. The
gallery's plot_*.py examples run here too (the documentation build runs them again, for their figures),
except plot_benchmark.py, which is fusedattn bench (tests/test_cli.py).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import PYTHON, subprocess_env

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


def run_example(name, tmp_path, *args, block_matplotlib=False):
    env = subprocess_env()
    if block_matplotlib:
        stub = tmp_path / "no_matplotlib"
        (stub / "matplotlib").mkdir(parents=True)
        (stub / "matplotlib" / "__init__.py").write_text('raise ImportError("matplotlib is blocked for this test")\n')
        env["PYTHONPATH"] = os.pathsep.join([str(stub), env["PYTHONPATH"]])
    proc = subprocess.run([PYTHON, "-W", "error", str(EXAMPLES / name), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{name} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr == "", f"{name} wrote to stderr:\n{proc.stderr}"
    return proc.stdout


def check_png(path):
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000, f"{path} is not a plausible PNG ({len(data)} bytes)"
    import matplotlib.image

    height, width = matplotlib.image.imread(str(path)).shape[:2]
    assert width >= 300 and height >= 200


def number_after(label, text):
    match = re.search(re.escape(label) + r"\s*([-+0-9.e]+)", text)
    assert match, f"{label!r} not found in:\n{text}"
    return float(match.group(1))


# ---------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------

SENTIMENT_WORDS = {"great", "wonderful", "loved", "brilliant", "awful", "boring", "hated", "terrible"}


def check_text_classification_output(out):
    assert number_after("test accuracy:", out) >= 0.9
    # Uniform pooling would give ~0.14: the learned query must concentrate on the sentiment word.
    assert number_after("mean attention weight on the sentiment word:", out) >= 0.4
    lines = [line for line in out.splitlines() if " p=" in line and "|" in line]
    assert len(lines) == 6
    for line in lines:
        starred = re.search(r"\*(\w+):", line).group(1)
        assert starred in SENTIMENT_WORDS, f"top word {starred!r} is not the sentiment word: {line}"
        label = line.split()[0]
        assert (label == "pos") == any(w in line for w in ("great", "wonderful", "loved", "brilliant")), line


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib (the [plot] extra) is not installed")
def test_text_classification_with_png(tmp_path):
    out = run_example("text_classification.py", tmp_path)
    check_text_classification_output(out)
    assert "saved heatmap: attention_map.png" in out
    check_png(tmp_path / "attention_map.png")  # the default: in the working directory


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib (the [plot] extra) is not installed")
def test_text_classification_output_argument(tmp_path):
    run_example("text_classification.py", tmp_path, str(tmp_path / "sub_heatmap.png"))
    check_png(tmp_path / "sub_heatmap.png")
    assert not (tmp_path / "attention_map.png").exists()


def test_text_classification_without_matplotlib(tmp_path):
    out = run_example("text_classification.py", tmp_path, block_matplotlib=True)
    check_text_classification_output(out)
    assert "PNG skipped" in out and "fusedattn[plot]" in out
    assert not (tmp_path / "attention_map.png").exists()


EXPECTED_ALIGNMENT = {"le": "the", "chat": "cat", "noir": "black", "était": "sat", "assis": "sat", "sur": "on",
                      "tapis": "mat"}


@pytest.mark.parametrize("block_matplotlib", [False, True], ids=["matplotlib", "no_matplotlib"])
def test_translation_attention(tmp_path, block_matplotlib):
    if not block_matplotlib and not HAVE_MATPLOTLIB:
        pytest.skip("matplotlib (the [plot] extra) is not installed")
    out = run_example("translation_attention.py", tmp_path, block_matplotlib=block_matplotlib)
    aligned = dict(re.findall(r"^\s+(\S+)\s+-> (\S+)$", out, flags=re.MULTILINE))
    assert aligned == EXPECTED_ALIGNMENT
    # The alignment table: 8 target rows of 7 weights, each row a distribution.
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in EXPECTED_ALIGNMENT
            and len(line.split()) == 8]
    assert len(rows) == 8
    for row in rows:
        assert abs(sum(float(x) for x in row[1:]) - 1.0) <= 0.04  # 7 entries rounded to 0.005 each
    # Cached step-by-step decoding reproduces the full-sequence layers (float32: ~1e-6).
    diffs = re.search(r"decoder states (\S+), cross-attention output (\S+), alignment (\S+)", out).groups()
    assert all(float(d) < 1e-4 for d in diffs), diffs
    if block_matplotlib:
        assert "PNG skipped" in out and "fusedattn[plot]" in out
        assert not (tmp_path / "alignment.png").exists()
    else:
        check_png(tmp_path / "alignment.png")


def test_additive_vs_dot(tmp_path):
    out = run_example("additive_vs_dot.py", tmp_path, "--seq", "96", "--repeats", "2", "--threads", "1")
    errors = re.search(r"dot (\S+), additive (\S+); \|NumPy additive - fused\| (\S+)", out).groups()
    assert all(float(e) < 1e-4 for e in errors), errors  # float32 results: ~1e-7 expected
    for score in ("dot", "additive"):
        row = re.search(rf"^\s+{score}\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)x$", out, flags=re.MULTILINE)
        assert row, f"no timing row for {score}:\n{out}"
        fused, naive, ratio = (float(x) for x in row.groups())
        assert fused > 0 and naive > 0 and ratio >= 0  # reported, not judged: timings are not asserted
    assert number_after("mean entropy of a row (uniform = ", out) == pytest.approx(np.log(96), abs=0.01)


# ---------------------------------------------------------------------------------------------
# fusedattn.plot.attention_map
# ---------------------------------------------------------------------------------------------

def test_attention_map_without_matplotlib(monkeypatch):
    from fusedattn.plot import attention_map

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.axes", None)
    with pytest.raises(ImportError, match=r"attention_map needs matplotlib.*pip install 'fusedattn\[plot\]'"):
        attention_map(np.eye(3))


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib", reason="matplotlib (the [plot] extra) is not installed")


def test_attention_map_draws_the_matrix(mpl, tmp_path):
    from matplotlib.axes import Axes

    from fusedattn.plot import attention_map

    w = np.random.default_rng(0).dirichlet(np.ones(5), size=3)  # (3, 5) rows summing to 1
    ax = attention_map(w, query_labels=["a", "b", "c"], key_labels=["v", "w", "x", "y", "z"])
    assert isinstance(ax, Axes)
    np.testing.assert_array_equal(ax.images[0].get_array(), w)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["v", "w", "x", "y", "z"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert ax.get_xlabel() == "key" and ax.get_ylabel() == "query"
    assert len(ax.figure.axes) == 2  # the heatmap and its colorbar
    ax.figure.savefig(tmp_path / "map.png")
    check_png(tmp_path / "map.png")


@pytest.mark.parametrize("shape,expected", [((1, 4, 6), (4, 6)), ((1, 1, 4, 6), (4, 6)), ((1, 6), (1, 6))])
def test_attention_map_squeezes_leading_ones(mpl, shape, expected):
    from fusedattn.plot import attention_map

    w = np.random.default_rng(1).random(shape)
    ax = attention_map(w)
    np.testing.assert_array_equal(ax.images[0].get_array(), w.reshape(expected))


def test_attention_map_uses_given_axes(mpl):
    from matplotlib.figure import Figure

    from fusedattn.plot import attention_map

    fig = Figure()
    target = fig.add_subplot(1, 2, 2)
    assert attention_map([[0.25, 0.75], [1.0, 0.0]], ax=target) is target
    assert len(target.images) == 1


@pytest.mark.parametrize("args,exc,pattern", [
    ((np.ones((2, 3, 4)),), ValueError, r"weights must have shape \(Lq, Lk\).*\(2, 3, 4\)"),
    ((np.ones(4),), ValueError, r"weights must have shape \(Lq, Lk\).*\(4,\)"),
    ((np.ones((0, 3)),), ValueError, r"weights must not be empty"),
    ((np.ones((2, 3), complex),), TypeError, r"weights must be a real-valued.*complex"),
    ((np.array([["a", "b"]]),), TypeError, r"weights must be a real-valued"),
    ((np.ones((2, 3)), ["a"]), ValueError, r"query_labels must have 2 entries.*got 1"),
    ((np.ones((2, 3)), None, ["a", "b"]), ValueError, r"key_labels must have 3 entries.*got 2"),
    ((np.ones((2, 3)), "ab"), TypeError, r"query_labels must be a sequence"),
    ((np.ones((2, 3)), None, None, "axes"), TypeError, r"ax must be a matplotlib Axes"),
])
def test_attention_map_errors(mpl, args, exc, pattern):
    from fusedattn.plot import attention_map

    with pytest.raises(exc, match=pattern):
        attention_map(*args)


def test_train_tiny_transformer(tmp_path):
    """The NumPy transformer trains through MultiHeadAttention.backward: the loss falls, accuracy beats chance."""
    out = run_example("train_tiny_transformer.py", tmp_path, "--quick")
    logged = re.findall(r"^step\s+\d+\s+loss ([0-9.]+)\s+accuracy ([0-9.]+)$", out, flags=re.MULTILINE)
    assert len(logged) >= 5, out
    losses = [float(loss) for loss, _ in logged]
    # Starts near ln(16) = 2.77 (uniform over 16 classes); measured ~0.45 after the quick run's 300 steps.
    assert losses[-1] < 0.5 * losses[0], losses
    chance = number_after("chance accuracy:", out)
    assert chance == pytest.approx(1 / 16, abs=1e-3)
    assert number_after("test accuracy:", out) > 4 * chance  # measured ~0.84 against chance 0.0625


# ---------------------------------------------------------------------------------------------
# The gallery's plot_* examples (the documentation build runs them too, and shows their figures)
# ---------------------------------------------------------------------------------------------

def run_gallery_example(name, tmp_path):
    pytest.importorskip("matplotlib", reason="the gallery examples draw with matplotlib (the [plot] extra)")
    env = subprocess_env()
    env["MPLBACKEND"] = "Agg"  # plt.show() returns at once, as under sphinx-gallery
    proc = subprocess.run([PYTHON, "-W", "error", str(EXAMPLES / name)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{name} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_gallery_speech(tmp_path):
    out = run_gallery_example("plot_speech.py", tmp_path)
    assert number_after("test accuracy:", out) >= 0.9
    # The learned query finds the whistle: measured 89% of test clips within 2 frames of it.
    assert number_after("most-attended frame within 2 frames of the whistle:", out) >= 60


def test_gallery_vision(tmp_path):
    out = run_gallery_example("plot_vision.py", tmp_path)
    assert "chosen patch (row 9, col 2) is red: True" in out
    red = re.search(r"on red patches: ([0-9.]+), on blue patches: ([0-9.]+)", out)
    assert float(red.group(1)) > 0.8 and float(red.group(2)) < 0.05, out


def test_gallery_kv_cache_decoding(tmp_path):
    out = run_gallery_example("plot_kv_cache_decoding.py", tmp_path)
    assert number_after("last step, max |cached - uncached| =", out) < 1e-4  # timings reported, not judged
    assert "with KVCache:" in out and "without cache:" in out


def test_gallery_long_context(tmp_path):
    out = run_gallery_example("plot_long_context.py", tmp_path)
    assert number_after("max |merged - one call| =", out) < 1e-5
    assert re.search(r"head 2, last query: (9\d|100)\.\d% of its attention in the needle's block", out), out
    if "Dask part skipped" not in out:
        assert number_after("max |dask - one call| =", out) < 1e-5


# ---------------------------------------------------------------------------------------------
# examples/paged_decoding.py (issue #15)
# ---------------------------------------------------------------------------------------------

def test_paged_decoding(tmp_path):
    proc = subprocess.run([PYTHON, "-W", "error", str(EXAMPLES / "paged_decoding.py"), "--steps", "120"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0 and proc.stderr == "", f"{proc.stdout}\n{proc.stderr}"
    out = proc.stdout
    assert number_after("decoded", out) >= 9 * 120 * 0.4  # every sequence decodes at least 40% of the steps
    assert re.search(r"in [0-9.]+ s: [0-9]+ tokens/s", out), out  # reported, not judged
    ratio = float(re.search(r"([0-9.]+)x smaller", out).group(1))
    assert 3.5 < ratio < 4  # int8 plus one float32 scale per 64 values: 4 * 64 / (64 + 4) = 3.76
    # Quantisation error of the attention output: ~1e-2 measured, against outputs of size ~1.
    assert number_after("max |int8 - float32| attention output =", out) < 0.05
