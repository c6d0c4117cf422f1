"""Every code snippet of the README and the documentation pages runs, and prints what the text says it prints.

The snippets are the fenced blocks of ``README.md`` and ``docs/**/*.md``:

* ```` ```pycon ```` blocks are doctests (``>>>`` prompts and their expected output; ``...`` elides);
* ```` ```python ```` blocks are executed; when the next fenced block is ```` ```text ````, it is the output the
  block must print (compared like a doctest's expected output, ``...`` included).

The blocks of one page run in order in one namespace, in a temporary working directory. An HTML comment on
the line before a block changes that: ``<!-- no-test: why -->`` skips it (GPU-only calls), and
``<!-- requires: dask -->`` skips it where the module cannot be imported. Shell blocks (``bash``) are not run.

The last test checks that every public name has a docstring: the API reference is generated from them.
"""
from __future__ import annotations

import contextlib
import doctest
import importlib
import inspect
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
PAGES = [p for p in PAGES if p.is_file() and "_build" not in p.parts and "auto_examples" not in p.parts
         and "generated" not in p.parts]

FENCE = re.compile(r"(?:<!--\s*(?P<marker>no-test|requires):?\s*(?P<arg>[^>]*?)\s*-->\s*\n)?"
                   r"^(?P<fence>```+)(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=fence)\s*$", re.M | re.S)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def blocks(path):
    """[(line, lang, body, marker, arg)] of the fenced blocks of ``path``, in order."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start("fence")) + 1, m.group("lang"), m.group("body"), m.group("marker"),
             (m.group("arg") or "").strip()) for m in FENCE.finditer(text)]


def _missing_module(name):
    try:
        importlib.import_module(name)
    except ImportError:
        return True
    return False


def _check_output(want, got):
    checker = doctest.OutputChecker()
    return checker.check_output(want, got, FLAGS)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_snippets(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = blocks(page)
    namespace = {"__name__": "__snippets__"}
    ran = 0
    skipped = []
    for index, (line, lang, body, marker, arg) in enumerate(found):
        where = f"{page.relative_to(ROOT)}:{line}"
        if lang not in ("python", "pycon"):
            continue
        if marker == "no-test":
            skipped.append(f"{where}: {arg}")
            continue
        if marker == "requires" and _missing_module(arg):
            skipped.append(f"{where}: needs {arg}")
            continue
        if lang == "pycon":
            test = doctest.DocTestParser().get_doctest(body, namespace, where, str(page), line)
            runner = doctest.DocTestRunner(optionflags=FLAGS)
            report = io.StringIO()
            runner.run(test, out=report.write, clear_globs=False)
            namespace = test.globs  # DocTest works on a copy: carry its names to the next block
            assert runner.failures == 0, f"{where}: the snippet does not print what the page says:\n{report.getvalue()}"
        else:
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                try:
                    exec(compile(body, where, "exec"), namespace)
                except Exception as exc:
                    raise AssertionError(f"{where}: the snippet raised {type(exc).__name__}: {exc}") from exc
            following = found[index + 1] if index + 1 < len(found) else None
            if following is not None and following[1] == "text":
                want = following[2]
                assert _check_output(want, stdout.getvalue()), (
                    f"{where}: the snippet printed\n{stdout.getvalue()}\nbut the page says it prints\n{want}")
        ran += 1
    if ran == 0:
        if skipped:
            pytest.skip("; ".join(skipped))
        pytest.skip("no Python snippets on this page")


def test_snippet_parser_sees_the_readme_example():
    readme = [b for b in blocks(ROOT / "README.md") if b[1] in ("python", "text")]
    assert [b[1] for b in readme[:2]] == ["python", "text"], "the README example and the output it prints"
    assert "fa.attention(" in readme[0][2]


def test_output_mismatch_is_caught():
    assert _check_output("True\n", "True\n")
    assert _check_output("max error ...\n", "max error 1e-07\n")
    assert not _check_output("(2, 8, 128, 64)\n", "(2, 8, 128, 32)\n")


def _public_objects():
    import fusedattn

    modules = [fusedattn, fusedattn.masks, fusedattn.plot, fusedattn.reference]
    seen = []
    for module in modules:
        for name in getattr(module, "__all__", []):
            if name == "__version__":
                continue
            obj = getattr(module, name)
            seen.append((f"{module.__name__}.{name}", obj))
            if inspect.isclass(obj):
                for member, value in vars(obj).items():
                    if not member.startswith("_") or member == "__call__":
                        seen.append((f"{module.__name__}.{name}.{member}", (obj, member, value)))
    return seen


@pytest.mark.parametrize("name,obj", _public_objects(), ids=[n for n, _ in _public_objects()])
def test_public_names_have_docstrings(name, obj):
    """Functions, classes, methods: their own docstring. A property without one must be named in its class's
    docstring (the layers list their parameters there, in torch's names)."""
    owner = None
    if isinstance(obj, tuple):
        owner, member, obj = obj
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        if not (obj.__doc__ or "").strip():
            assert member in (owner.__doc__ or ""), f"{name}: a property with no docstring, not named in the class's"
        return
    if not callable(obj) and not inspect.ismodule(obj):
        return  # a constant: documented where its class is
    assert (getattr(obj, "__doc__", None) or "").strip(), f"{name} has no docstring (the API reference shows it)"
