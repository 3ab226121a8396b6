"""C++/OpenMP CPU backend for the moyu kernels (fp32 and bf16).

The extension in `csrc/sparse_cpu.cpp` is compiled on first use with
`torch.utils.cpp_extension.load` (needs a C++ compiler and ninja) and cached by torch under
`TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`). It is built with `-march=native`,
so the cache key includes a hash of this CPU's feature flags and the torch version: a cache
directory shared between different machines never loads code built for another CPU.

Dispatch of `sparse_linear` by the number of rows (tokens) in `x`:

- 1 to `MAX_SPARSE_ROWS` rows: the sparse kernel reads only the weight rows of the channels that
  are above threshold in at least one row. Above `ALWAYS_SPARSE_ROWS` rows, when that union
  exceeds `MAX_ACTIVE_FRACTION` of the channels, the kernel zeroes the inactive entries and runs
  the dense matmul instead, because the sparse kernel then reads about as much and computes less
  efficiently.
- More rows (prefill): the dense matmul of the kept values, so prefill runs at the speed of a
  dense GEMM on the transposed weight.

Inputs the kernel does not cover (dtypes other than float32 and bfloat16, x and weight of
different dtypes, or empty tensors) go through the torch reference, with the same results.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch

from . import reference

# Largest number of rows (tokens) handled by the sparse kernel. More rows use the dense matmul.
MAX_SPARSE_ROWS = 8

# Up to this many rows the sparse kernel runs whatever the union of active channels. This was
# measured with one thread and hot weights (576x1536 and 1536x576, fp32 and bf16) on a 2-core AMD
# EPYC Zen 4. At 2 to 4 rows the kernel was 1.0x to 2.2x faster than masking plus the dense
# matmul, even with every channel active.
# NOTE: that machine was shared with other jobs while measuring, so the figures are estimates.
ALWAYS_SPARSE_ROWS = 4

# From ALWAYS_SPARSE_ROWS + 1 to MAX_SPARSE_ROWS rows: the largest union of active channels, as
# a fraction of K, that still runs the sparse kernel. In the same measurement at 8 rows, dense
# became faster between 80% and 90% union in fp32 and around 80% in bf16.
MAX_ACTIVE_FRACTION = 0.8

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
_SOURCE = Path(__file__).resolve().parent / "csrc" / "sparse_cpu.cpp"
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]

_lock = threading.Lock()
_extension: ModuleType | None = None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _extension_name() -> str:
    key = "\n".join([_cpu_flags(), torch.__version__, " ".join(_CFLAGS)])
    return "moyu_cpu_kernels_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _check_toolchain() -> None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"C++ compiler {compiler!r} not found on PATH; install g++ (or set CXX) to build the moyu CPU kernels"
        )
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as exc:
        raise RuntimeError("ninja not found; install it (pip install ninja) to build the moyu CPU kernels") from exc


def ensure_built() -> ModuleType:
    """Build (or load from torch's extension cache) the C++ extension and return it.

    Raises:
        RuntimeError: the compiler or ninja is missing, or the build failed (the first line of
            the compiler output is in the message, the full output in the chained exception).
        ImportError: the built library cannot be imported.
    """
    global _extension
    if _extension is not None:
        return _extension
    with _lock:
        if _extension is not None:
            return _extension
        _check_toolchain()
        from torch.utils import cpp_extension

        try:
            module = cpp_extension.load(
                name=_extension_name(),
                sources=[str(_SOURCE)],
                extra_cflags=_CFLAGS,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except RuntimeError as exc:
            detail = next((line for line in str(exc).splitlines() if "error" in line.lower()), str(exc))
            raise RuntimeError(f"building the moyu CPU kernels from {_SOURCE} failed: {detail.strip()}") from exc
        _extension = module
        return module


def _kernel_covers(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype in _SUPPORTED_DTYPES
        and weight.dtype == x.dtype
        and x.numel() > 0
        and weight.numel() > 0
    )


def sparse_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multiply the above-threshold entries of `x` by `weight_t` (see `reference.sparse_linear`).

    A `weight_t` that is not contiguous is copied on every call, so keep it contiguous.
    """
    K = x.shape[-1]
    if weight_t.dim() != 2 or weight_t.shape[0] != K:
        raise ValueError(f"weight_t must be [K={K}, N], got {tuple(weight_t.shape)}")
    if threshold.numel() != K:
        raise ValueError(f"threshold must have K={K} entries, got {threshold.numel()}")
    if not _kernel_covers(x, weight_t):
        return reference.sparse_linear(x, weight_t, threshold, bias)

    extension = ensure_built()
    N = weight_t.shape[1]
    rows = x.reshape(-1, K).contiguous()
    max_active_fraction = 1.0 if rows.shape[0] <= ALWAYS_SPARSE_ROWS else MAX_ACTIVE_FRACTION
    y = extension.sparse_linear(
        rows,
        weight_t.contiguous(),
        threshold.to(torch.float32).contiguous(),
        None if bias is None else bias.to(torch.float32).contiguous(),
        MAX_SPARSE_ROWS,
        max_active_fraction,
    )
    return y.reshape(*x.shape[:-1], N)


def masked_rows_linear(x: torch.Tensor, weight: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """Compute only the output rows selected by `row_mask` (see `reference.masked_rows_linear`).

    One row (batch 1) runs the C++ kernel, which reads only the selected rows of `weight`; more
    rows use the reference math.
    """
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must be [N, K={K}], got {tuple(weight.shape)}")
    if x.numel() != K or not _kernel_covers(x, weight):
        return reference.masked_rows_linear(x, weight, row_mask)

    extension = ensure_built()
    N = weight.shape[0]
    mask = row_mask.reshape(-1)
    if mask.numel() != N:
        raise ValueError(f"row_mask must have N={N} entries for one row, got {tuple(row_mask.shape)}")
    y = extension.masked_rows_linear_single(
        x.reshape(K).contiguous(), weight.contiguous(), mask.to(torch.bool).contiguous()
    )
    return y.reshape(*x.shape[:-1], N)
