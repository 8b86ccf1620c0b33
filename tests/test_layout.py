"""The checkout's top-level folders are mapped onto ``flotilla.*`` (pyproject.toml); Python run from the checkout's
root also sees each folder that is a regular package under its bare name, where it would shadow an installed module
of that name. transformers 5.25 began importing the ``kernels`` distribution, and ``kernels/`` (then a regular
package) broke every model config loaded from the root: these tests keep that from happening again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_engine_and_transformers_import_from_the_checkouts_root():
    done = _python("import transformers.activations, transformers.models.llama.configuration_llama\n"
                   "import flotilla.engine, flotilla.kernels.paged_attention, flotilla.kernels.cpu_build\n"
                   "from flotilla.engine.cli import build_parser\n", ROOT)
    assert done.returncode == 0, done.stderr


def test_no_top_level_package_folder_has_the_name_of_an_installed_module(tmp_path):
    """A folder with an ``__init__.py`` is fine only while nothing installed has its name; ``operator/`` and
    ``kernels/`` are namespace folders for that reason (flotilla/__init__.py)."""
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "flotilla")
    assert packages, "engine/ and router/ are regular packages"
    found = _python("import importlib.util\n"
                    f"print(' '.join(n for n in {packages!r} if importlib.util.find_spec(n) is not None))", tmp_path)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [], f"installed modules that a folder of the checkout shadows: {found.stdout}"
