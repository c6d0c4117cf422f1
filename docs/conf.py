"""Sphinx configuration of the fusedattn documentation.

Build (from the repository root):  pip install ".[docs]" && python -m sphinx -W --keep-going -b html docs docs/_build/html

The API reference is generated from the installed package's docstrings (autodoc + autosummary, Google-style
Args/Returns read by napoleon); the gallery runs every ``examples/plot_*.py`` (and text_classification.py,
translation_attention.py, paged_decoding.py) at build time and shows its output and figures.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import fusedattn

ROOT = Path(__file__).resolve().parents[1]

project = "fusedattn"
author = "the fusedattn developers"
copyright = "2026, the fusedattn developers"
release = fusedattn.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json", "auto_examples/*.md5"]
templates_path = ["_templates"]
# The gallery configuration holds a scraper object and a function, which Sphinx cannot pickle into its cache.
suppress_warnings = ["config.cache"]
html_static_path = []

# --- API reference -------------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings say what each argument takes, shapes included
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_custom_sections = [("Raises", "params_style")]

# A reference to a fusedattn name that does not exist is an error (with -W): nitpicky checks every one.
nitpicky = True

# --- Markdown pages ------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

# --- Cross-references to NumPy, Dask and PyTorch ----------------------------------------------------
_INVENTORIES = {
    "numpy": "https://numpy.org/doc/stable/",
    "python": "https://docs.python.org/3/",
    "dask": "https://docs.dask.org/en/stable/",
    "torch": "https://docs.pytorch.org/docs/stable/",
}


def _online(host: str = "numpy.org") -> bool:
    if os.environ.get("FUSEDATTN_DOCS_OFFLINE"):
        return False
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


# An unreachable inventory is a warning, so -W would fail an offline build on it: offline (no route to
# numpy.org, or FUSEDATTN_DOCS_OFFLINE=1) the external links are left as plain text instead.
# Private modules (``fusedattn._backend``...) are not in the reference: a docstring may still name them.
nitpick_ignore_regex = [(r"py:.*", r"fusedattn\._\w+(\..*)?")]
if _online():
    intersphinx_mapping = {name: (url, None) for name, url in _INVENTORIES.items()}
else:
    intersphinx_mapping = {}
    nitpick_ignore_regex.append((r"py:.*", r"(numpy|torch|dask|python)\..*"))
    print("fusedattn docs: offline, intersphinx links to NumPy / Dask / PyTorch left out")
intersphinx_timeout = 10

# --- Gallery -------------------------------------------------------------------------------------
# Each example runs at build time on the build machine's cores: keep them light (seconds on 2 cores).


class DiskPngScraper:
    """Scrape PNG files an example wrote into its working directory (fusedattn.plot draws on its own Agg
    canvas, not through pyplot, so the matplotlib scraper alone would miss those figures).

    Only files written since the build started are taken (an older PNG left by a manual run is not the
    example's output), and each is moved into the gallery, so it is shown once.
    """

    def __init__(self):
        self.since = time.time()

    def __repr__(self):  # sphinx-gallery keys its cache on the repr
        return "DiskPngScraper"

    def __call__(self, block, block_vars, gallery_conf):
        from sphinx_gallery.scrapers import figure_rst

        src_dir = Path(block_vars["src_file"]).parent
        images = []
        for png in sorted(src_dir.glob("*.png")):
            if png.stat().st_mtime < self.since:
                continue
            target = next(block_vars["image_path_iterator"])
            shutil.move(str(png), target)
            images.append(target)
        return figure_rst(images, gallery_conf["src_dir"])


sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/(plot_\w+|text_classification|translation_attention|paged_decoding)\.py$",
    "ignore_pattern": r"(__init__|conftest|additive_vs_dot|dask_long_context|quickstart|train_tiny_transformer)\.py$",
    "image_scrapers": ("matplotlib", DiskPngScraper()),
    "reset_argv": lambda gallery_conf, script_vars: [],
    "abort_on_example_error": False,  # every failing example is reported; -W turns any into a failure
    "only_warn_on_example_error": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "show_memory": False,
    "download_all_examples": False,
    "matplotlib_animations": False,
    "plot_gallery": "True",
}

# --- HTML ----------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"fusedattn {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_context = {"default_mode": "light"}
html_show_sourcelink = False

# Everything in the package is public API only through fusedattn.__all__ (and fusedattn.dask / .cuda / .masks):
# a name in __all__ without a docstring fails the build (tests/test_docs_snippets.py checks it too).


def _check_docstrings(app):
    missing = [name for name in fusedattn.__all__ if name != "__version__"
               and not (getattr(getattr(fusedattn, name), "__doc__", None) or "").strip()]
    if missing:
        from sphinx.util import logging

        logging.getLogger(__name__).warning("public names without a docstring: %s", ", ".join(missing))


def setup(app):
    app.connect("builder-inited", _check_docstrings)
