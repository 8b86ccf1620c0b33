"""Flotilla: a paged-attention LLM inference engine and the Kubernetes operator that runs fleets of it.

The subpackages live in top-level folders (``engine/``, ``kernels/``, ``operator/``) mapped onto this
package by ``pyproject.toml``. ``operator/`` and ``kernels/`` deliberately have no ``__init__.py``: as regular
packages they would shadow, whenever Python runs from the repository root, the standard library's ``operator``
and the ``kernels`` distribution that transformers imports (tests/test_layout.py). The symlinks
``flotilla/operator`` and ``flotilla/kernels`` let an editable install resolve those namespace packages; wheels
copy the files in place.
"""
