"""Flotilla: a paged-attention LLM inference engine and the Kubernetes operator that runs fleets of it.

The subpackages live in top-level folders (``engine/``, ``kernels/``, ``operator/``) mapped onto this
package by ``pyproject.toml``. ``operator/`` deliberately has no ``__init__.py``: as a regular package it
would shadow the standard library's ``operator`` whenever Python runs from the repository root. The
symlink ``flotilla/operator`` lets an editable install resolve that namespace package; wheels copy the
files in place.
"""
