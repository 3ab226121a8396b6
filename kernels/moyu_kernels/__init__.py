"""Sparse kernels for moyu, installed as `moyu_kernels`.

Every backend exposes the functions of `reference.py` with the same signatures and semantics:

- `sparse_linear(x, weight_t, threshold, bias=None)`
- `masked_rows_linear(x, weight, row_mask)`

`get_backend(name)` returns a backend module for "torch" (the reference), "cpu" (C++/OpenMP
extension built on first use) or "triton" (GPU). "auto" picks the fastest that works here.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "cpu", "triton")


class BackendUnavailable(RuntimeError):
    """The requested kernel backend cannot run on this machine (the message gives the reason)."""


def _load(name: str) -> ModuleType:
    if name == "torch":
        return importlib.import_module("moyu_kernels.reference")
    if name == "cpu":
        module = importlib.import_module("moyu_kernels.cpu")
        module.ensure_built()
        return module
    if name == "triton":
        module = importlib.import_module("moyu_kernels.triton_kernels")
        module.ensure_available()
        return module
    raise BackendUnavailable(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")


def get_backend(name: str = "auto", device: str = "cpu") -> tuple[str, ModuleType]:
    """Return `(resolved_name, module)` for the backend `name` on `device`.

    "auto" tries triton on a CUDA device and cpu on the CPU, and falls back to the torch
    reference with a logged warning that names the reason.
    """
    if name != "auto":
        try:
            return name, _load(name)
        except (ImportError, RuntimeError, OSError) as exc:
            if isinstance(exc, BackendUnavailable):
                raise
            raise BackendUnavailable(f"kernel backend {name!r} is not available here: {exc}") from exc
    preferred = "triton" if device.startswith("cuda") else "cpu"
    try:
        return preferred, _load(preferred)
    except (ImportError, RuntimeError, OSError) as exc:
        logger.warning("kernel backend %r unavailable (%s); using the torch reference", preferred, exc)
        return "torch", _load("torch")
