"""Sphinx configuration for skpipe's documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import skpipe  # noqa: E402 - after the path, to document this checkout

project = "skpipe"
author = "the skpipe developers"
copyright = "2026, the skpipe developers"
release = version = skpipe.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autosummary_generate = False
numpydoc_show_class_members = False
numpydoc_validation_checks = set()
autodoc_typehints = "none"
html_theme = "alabaster"
nitpicky = False
suppress_warnings = ["myst.header"]
myst_heading_anchors = 3
