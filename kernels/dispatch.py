"""The one rule that picks an implementation for a kernel family: Triton on CUDA, the torch reference
elsewhere, overridable by name or by an environment variable (tests force Triton on the CPU under
``TRITON_INTERPRET=1``; operators force torch on CUDA to bisect a numerical problem)."""

from __future__ import annotations

import functools
import os
import sys

import torch

IMPLEMENTATIONS = ("torch", "triton")


def triton_available() -> bool:
    """Triton imports (Linux wheels only) — on the CPU it can only run under ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401  (the import is the check)
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(device: torch.device | str, name: str = "auto", env_var: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for kernels on ``device``. An explicit ``name`` wins, then ``env_var``'s
    value, then the default (Triton on CUDA when it imports, torch elsewhere). Asking for Triton where it
    cannot run raises, rather than silently measuring or testing the wrong thing."""
    device = torch.device(device)
    if name == "auto" and env_var:
        name = os.environ.get(env_var, "auto").strip().lower() or "auto"
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown kernel implementation {name!r}: expected auto, torch or triton")
    if name == "triton":
        if not triton_available():
            raise ValueError("the triton implementation was asked for but triton does not import")
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"triton kernels need a CUDA device or TRITON_INTERPRET=1, not {device}")
    return name


def env_override(env_var: str) -> str:
    """A kernel family's override variable, normalised (``auto`` when unset)."""
    return os.environ.get(env_var, "auto").strip().lower() or "auto"


def resolve_cached(device_type: str, override: str) -> str:
    """``resolve`` memoised for the per-layer call sites of the forward pass; keyed on ``TRITON_INTERPRET`` too, so
    a test that changes the environment gets a fresh decision."""
    return _resolve_memo(device_type, override, os.environ.get("TRITON_INTERPRET", "0"))


@functools.lru_cache(maxsize=None)
def _resolve_memo(device_type: str, override: str, interpret: str) -> str:
    return resolve(torch.device(device_type), override)


def block_triton_if_unused(override_envs: tuple[str, ...]) -> bool:
    """For a process where no kernel can run on Triton (no CUDA, no interpreter, no ``override_envs`` variable
    asking for it), make ``import triton`` fail as if it were not installed, so that libraries probing for it
    (transformers imports torch._dynamo, which imports triton when present) leave it out: a CPU server then
    neither loads it nor prints nanobind's leak report at exit. For process entry points only (``flotilla
    serve``, tensor-parallel workers): a library must not change its host's imports. True when it blocked."""
    if "triton" in sys.modules or interpreting() or torch.cuda.is_available():
        return False
    if any(os.environ.get(v, "").strip().lower() == "triton" for v in override_envs):
        return False
    sys.modules["triton"] = None  # the import system's own "not importable" marker
    return True
