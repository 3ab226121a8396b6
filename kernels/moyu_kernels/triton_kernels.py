"""Triton GPU backend for the moyu sparse kernels (same contract as `reference.py`).

Decode path (at most `MAX_DECODE_ROWS` rows): one split-K GEMV launch. Each program owns a
block of output columns and a slice of the input channels. For every block of channels it loads
x, applies the per-channel threshold in registers, takes the union of kept channels over the
batch rows, and loads only the weight rows of those channels. A masked `tl.load` issues no memory
transaction for a masked-off lane, so a skipped channel costs no weight bandwidth. Each batch row
still uses its own mask because its dropped entries are zeroed before the multiply.

Split-K reduction: every program writes its float32 partial tile to a scratch buffer, then
increments a per-column-block arrival counter with an acq_rel atomic. The program that arrives
last sums the partials in split order, adds the bias, casts and stores the output, and resets the
counter to zero. This keeps the whole product in one launch (a separate reduce kernel costs a few
microseconds, a large share of a 10-30 us decode GEMV), never spins, and gives the same result on
every run. The counters live in a zeroed int32 buffer cached per (device, stream).

Prefill path (more than `MAX_DECODE_ROWS` rows): the thresholded x goes through a dense torch
matmul, so prefill runs at cuBLAS speed whatever the weight layout.

Under `TRITON_INTERPRET=1` the same kernels run on CPU tensors in the Triton interpreter, which is
how the tests check them without a GPU. The interpreter's `tl.dot` returns wrong values for
bfloat16 inputs (seen with triton 3.9.0), so there bfloat16 batches of 2-8 rows use the
broadcast-multiply path instead of `tl.dot`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from . import reference

try:
    import triton
    import triton.language as tl
except ImportError as _exc:  # the module stays importable so that ensure_available() can explain
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR: ImportError | None = _exc
else:
    _TRITON_IMPORT_ERROR = None

logger = logging.getLogger(__name__)

MAX_DECODE_ROWS = 8
"""Largest number of rows that takes the sparse GEMV kernels; more rows use a dense matmul."""

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETER_PROGRAMS = 4
"""Program count the launch planner aims for under the interpreter, so that tests see split-K."""


def _jit(fn):
    # Without triton the kernels stay plain functions; ensure_available() raises before any launch.
    return triton.jit(fn) if triton is not None else fn


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@_jit
def _round_to_bfloat16(value):
    """Round float32 to the nearest bfloat16 (ties to even), returned as float32.

    Integer rounding gives the same result on a GPU and in the Triton interpreter, whose float32 to
    bfloat16 cast truncates (triton 3.9.0) where a GPU and torch round to nearest.
    """
    bits = value.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@_jit
def _load_kept_x(x_ptr, thr_ptr, offs_m, offs_k, m_mask, k_mask, stride_xm, stride_xk):
    """Load a [BLOCK_M, BLOCK_K] tile of x with dropped entries zeroed, and the kept mask."""
    x = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
        mask=m_mask[:, None] & k_mask[None, :],
        other=0.0,
    )
    # The reference compares in the dtype of x, so round the threshold to that dtype first.
    thr = tl.load(thr_ptr + offs_k, mask=k_mask, other=float("inf")).to(tl.float32)
    if x.dtype == tl.bfloat16:
        thr = _round_to_bfloat16(thr)
    else:
        thr = thr.to(x.dtype).to(tl.float32)
    # Padding rows must not mark a channel active (a threshold of -1 keeps even a zero).
    kept = (tl.abs(x.to(tl.float32)) > thr[None, :]) & m_mask[:, None]
    return tl.where(kept, x, 0.0), kept


@_jit
def _finish_split_k(acc, partial_ptr, counter_ptr, pid_n, pid_k, offs_m, offs_n, tile_mask, M, N,
                    SPLIT_K: tl.constexpr):
    """Reduce the float32 partial tiles of one column block; returns (total, is_last_program).

    Only the program that arrives last gets the full sum, and only it may store the output.
    """
    if SPLIT_K == 1:
        total = acc
        is_last = pid_k == 0  # always true: the grid has one split
    else:
        tile_offsets = offs_m[:, None] * N + offs_n[None, :]
        tl.store(partial_ptr + pid_k * M * N + tile_offsets, acc, mask=tile_mask)
        # Every thread's partial store must be ordered before the release of the arrival count.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        is_last = arrived == SPLIT_K - 1
        total = tl.zeros_like(acc)
        if is_last:
            for split in range(SPLIT_K):
                # .cg reads through L2, never a stale L1 line written by another SM's program.
                total += tl.load(partial_ptr + split * M * N + tile_offsets, mask=tile_mask, other=0.0,
                                 cache_modifier=".cg")
            tl.atomic_xchg(counter_ptr + pid_n, 0)
    return total, is_last


@_jit
def _sparse_linear_kernel(
    x_ptr, w_ptr, thr_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
):
    """out[M, N] = kept(x)[M, K] @ weight_t[K, N] (+ bias), grid (column blocks, SPLIT_K)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    if BLOCK_M == 1:
        # GEMV: accumulate elementwise and reduce over K once, after the loop.
        acc_2d = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            x, kept = _load_kept_x(x_ptr, thr_ptr, offs_m, offs_k, m_mask, k_mask, stride_xm, stride_xk)
            active = tl.max(kept.to(tl.int32), axis=0) > 0
            w = tl.load(
                w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn,
                mask=active[:, None] & n_mask[None, :],
                other=0.0,
            )
            x_col = tl.sum(x.to(tl.float32), axis=0)  # [BLOCK_K]: the single row as a column
            acc_2d += x_col[:, None] * w.to(tl.float32)
        acc = tl.sum(acc_2d, axis=0)[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            x, kept = _load_kept_x(x_ptr, thr_ptr, offs_m, offs_k, m_mask, k_mask, stride_xm, stride_xk)
            # Union over the batch rows: a channel is read when any row keeps it.
            active = tl.max(kept.to(tl.int32), axis=0) > 0
            w = tl.load(
                w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn,
                mask=active[:, None] & n_mask[None, :],
                other=0.0,
            )
            if USE_DOT:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)

    tile_mask = m_mask[:, None] & n_mask[None, :]
    total, is_last = _finish_split_k(acc, partial_ptr, counter_ptr, pid_n, pid_k, offs_m, offs_n,
                                     tile_mask, M, N, SPLIT_K)
    if is_last:
        if HAS_BIAS:
            total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
            total.to(out_ptr.dtype.element_ty),
            mask=tile_mask,
        )


@_jit
def _masked_rows_kernel(
    x_ptr, w_ptr, mask_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_mm, stride_mn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
):
    """out[M, N] = where(row_mask, x[M, K] @ weight[N, K]^T, 0), grid (row blocks, SPLIT_K)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    tile_mask = m_mask[:, None] & n_mask[None, :]
    row_mask = tl.load(mask_ptr + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                       mask=tile_mask, other=0) != 0
    # Union over the batch rows: a weight row is read when any batch row selects it.
    active = tl.max(row_mask.to(tl.int32), axis=0) > 0
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    if BLOCK_M == 1:
        acc_2d = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            x = tl.load(x_ptr + offs_k * stride_xk, mask=k_mask, other=0.0)
            w = tl.load(
                w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk,
                mask=active[:, None] & k_mask[None, :],
                other=0.0,
            )
            acc_2d += w.to(tl.float32) * x.to(tl.float32)[None, :]
        acc = tl.sum(acc_2d, axis=1)[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(
                w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk,
                mask=active[:, None] & k_mask[None, :],
                other=0.0,
            )
            if USE_DOT:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)

    total, is_last = _finish_split_k(acc, partial_ptr, counter_ptr, pid_n, pid_k, offs_m, offs_n,
                                     tile_mask, M, N, SPLIT_K)
    if is_last:
        total = tl.where(row_mask, total, 0.0)
        tl.store(
            out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
            total.to(out_ptr.dtype.element_ty),
            mask=tile_mask,
        )


# --------------------------------------------------------------------------------------------
# Availability and launch planning
# --------------------------------------------------------------------------------------------


def _kernels_interpreted() -> bool:
    return type(_sparse_linear_kernel).__name__ == "InterpretedFunction"


def ensure_available() -> None:
    """Raise ImportError or RuntimeError with a one-line reason when these kernels cannot run."""
    if triton is None:
        raise ImportError(f"the triton package is not installed ({_TRITON_IMPORT_ERROR}); "
                          "install it with `pip install 'moyu[gpu]'`")
    if _interpreter_requested() != _kernels_interpreted():
        raise RuntimeError("TRITON_INTERPRET changed after moyu_kernels.triton_kernels was imported; "
                           "set it before the first import")
    if _kernels_interpreted():
        return
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available (torch.cuda.is_available() is False); "
                           "run on a GPU or set TRITON_INTERPRET=1 for the CPU interpreter")


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and split-K factor of one kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    use_dot: bool
    num_warps: int = 4
    num_stages: int = 3


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    # Four programs per SM keep enough loads in flight to saturate HBM.
    # NOTE: an estimate from the usual GEMV occupancy, not tuned on a GPU yet.
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _choose_split_k(num_blocks: int, K: int, block_k: int, target_programs: int,
                    min_iterations: int) -> tuple[int, int]:
    """Return (split_k, k_per_split) so that every split covers at least `min_iterations` blocks."""
    k_blocks = triton.cdiv(K, block_k)
    requested = max(1, round(target_programs / num_blocks))
    split_k = max(1, min(requested, k_blocks // min_iterations))
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    # Rounding k_per_split up can leave the last splits empty: drop them.
    return triton.cdiv(K, k_per_split), k_per_split


def plan_launch(kind: str, rows: int, K: int, N: int, dtype: torch.dtype,
                device: torch.device) -> LaunchConfig:
    """Pick tile sizes and split-K for `kind` ("sparse_linear" or "masked_rows") at `rows` rows."""
    interpreted = device.type != "cuda"
    block_m = 1 if rows == 1 else 16
    # tl.dot needs every tile dimension to be at least 16, so batches of 2-8 rows pad to 16.
    use_dot = block_m > 1 and not (interpreted and dtype == torch.bfloat16)
    if not use_dot and block_m > 1:
        block_m = triton.next_power_of_2(rows)
    if interpreted:
        # Small tiles so that the small test shapes still cover several blocks and splits.
        block_n, block_k, min_iterations = 32, 16, 1
    elif kind == "sparse_linear":
        # 128 columns are 256 contiguous bytes of one weight row in 16-bit dtypes.
        block_n, block_k, min_iterations = (128, 64, 4) if dtype != torch.float32 else (64, 64, 4)
    else:
        # masked_rows reads weight rows along K: 128 channels are 256 contiguous bytes.
        block_n, block_k, min_iterations = (32, 128, 4) if dtype != torch.float32 else (32, 64, 4)
    num_blocks = triton.cdiv(N, block_n)
    split_k, _ = _choose_split_k(num_blocks, K, block_k, _target_programs(device), min_iterations)
    return LaunchConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k,
                        use_dot=use_dot)


_counter_buffers: dict[tuple, torch.Tensor] = {}


def _arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """Return a zeroed int32 buffer of at least `count` arrival counters for this device and stream.

    Kernels leave the counters at zero when they finish, so the buffer is reused as it is.
    Launches on one stream run in order; a second stream gets its own buffer.
    NOTE: a CUDA graph captured on a side stream keeps that stream's buffer; untested on a GPU.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    buffer = _counter_buffers.get(key)
    if buffer is None or buffer.numel() < count:
        buffer = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _counter_buffers[key] = buffer
    return buffer


# --------------------------------------------------------------------------------------------
# Launchers on 2-D inputs
# --------------------------------------------------------------------------------------------


def _launch_sparse_linear(x2d: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor,
                          bias: torch.Tensor | None, config: LaunchConfig) -> torch.Tensor:
    M, K = x2d.shape
    N = weight_t.shape[1]
    out = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    num_blocks = triton.cdiv(N, config.block_n)
    k_per_split = triton.cdiv(triton.cdiv(K, config.block_k), config.split_k) * config.block_k
    split_k = triton.cdiv(K, k_per_split)
    partials = torch.empty((split_k, M, N), dtype=torch.float32, device=x2d.device) if split_k > 1 else out
    counters = _arrival_counters(x2d.device, num_blocks)
    _sparse_linear_kernel[(num_blocks, split_k)](
        x2d, weight_t, threshold, bias if bias is not None else out, out, partials, counters,
        M, N, K, k_per_split,
        x2d.stride(0), x2d.stride(1), weight_t.stride(0), weight_t.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, SPLIT_K=split_k, USE_DOT=config.use_dot,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def _launch_masked_rows(x2d: torch.Tensor, weight: torch.Tensor, mask2d: torch.Tensor,
                        config: LaunchConfig) -> torch.Tensor:
    M, K = x2d.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    num_blocks = triton.cdiv(N, config.block_n)
    k_per_split = triton.cdiv(triton.cdiv(K, config.block_k), config.split_k) * config.block_k
    split_k = triton.cdiv(K, k_per_split)
    partials = torch.empty((split_k, M, N), dtype=torch.float32, device=x2d.device) if split_k > 1 else out
    counters = _arrival_counters(x2d.device, num_blocks)
    mask_bytes = mask2d.view(torch.uint8)
    _masked_rows_kernel[(num_blocks, split_k)](
        x2d, weight, mask_bytes, out, partials, counters,
        M, N, K, k_per_split,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        mask_bytes.stride(0), mask_bytes.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT_K=split_k, USE_DOT=config.use_dot,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


# --------------------------------------------------------------------------------------------
# Public API (same signatures and semantics as reference.py)
# --------------------------------------------------------------------------------------------

_warned_fallbacks: set[tuple] = set()


def _kernel_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Check the dtypes and device; warn once per case that falls back to the torch reference."""
    expected_device = "cpu" if _kernels_interpreted() else "cuda"
    if x.device.type != expected_device or weight.device != x.device:
        raise ValueError(f"the triton backend expects {expected_device} tensors "
                         f"(x is on {x.device}, weight on {weight.device})")
    if x.dtype == weight.dtype and x.dtype in _SUPPORTED_DTYPES:
        return True
    case = (x.dtype, weight.dtype)
    if case not in _warned_fallbacks:
        _warned_fallbacks.add(case)
        logger.warning("triton kernels support equal float16, bfloat16 or float32 dtypes; "
                       "x is %s and the weight %s, so the torch reference runs instead", *case)
    return False


def sparse_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multiply the above-threshold entries of `x` by `weight_t`.

    Args:
        x: activations `[..., K]`.
        weight_t: transposed weight `[K, N]`; rows should be contiguous (stride 1 along N).
        threshold: per-channel threshold `[K]`; an entry is kept when `abs(x) > threshold`.
        bias: optional `[N]`.

    Returns:
        `[..., N]` in the dtype of `x`; the product accumulates in float32 (on the prefill path
        cuBLAS chooses the accumulation, as it does for a dense layer).
    """
    ensure_available()
    if weight_t.dim() != 2 or x.shape[-1] != weight_t.shape[0]:
        raise ValueError(f"sparse_linear expects x [..., K] and weight_t [K, N]; "
                         f"got x {tuple(x.shape)} and weight_t {tuple(weight_t.shape)}")
    K, N = weight_t.shape
    if threshold.shape != (K,):
        raise ValueError(f"threshold must have shape ({K},); got {tuple(threshold.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},); got {tuple(bias.shape)}")
    if not _kernel_supports(x, weight_t):
        return reference.sparse_linear(x, weight_t, threshold, bias)

    lead_shape = x.shape[:-1]
    x2d = x.reshape(-1, K)
    rows = x2d.shape[0]
    if rows == 0 or N == 0 or K == 0:
        return reference.sparse_linear(x, weight_t, threshold, bias)
    if rows > MAX_DECODE_ROWS:
        kept = torch.where(x2d.abs() > threshold.to(x.dtype), x2d, torch.zeros((), dtype=x.dtype, device=x.device))
        if bias is None:
            out = kept @ weight_t
        else:
            out = torch.addmm(bias.to(x.dtype), kept, weight_t)
        return out.reshape(*lead_shape, N)

    config = plan_launch("sparse_linear", rows, K, N, x.dtype, x.device)
    out = _launch_sparse_linear(x2d, weight_t, threshold.contiguous(), bias, config)
    return out.reshape(*lead_shape, N)


def masked_rows_linear(x: torch.Tensor, weight: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """Compute only the output rows selected by `row_mask`; the others are zero.

    Args:
        x: activations `[..., K]`.
        weight: weight in the usual `[N, K]` layout; rows should be contiguous (stride 1 along K).
        row_mask: bool `[..., N]` (broadcast against the output), True where the output is computed.

    Returns:
        `[..., N]` in the dtype of `x`, zero where `row_mask` is False.
    """
    ensure_available()
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"masked_rows_linear expects x [..., K] and weight [N, K]; "
                         f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if row_mask.dtype != torch.bool:
        raise ValueError(f"row_mask must be a bool tensor; got {row_mask.dtype}")
    N, K = weight.shape
    if not _kernel_supports(x, weight):
        return reference.masked_rows_linear(x, weight, row_mask)

    lead_shape = x.shape[:-1]
    x2d = x.reshape(-1, K)
    rows = x2d.shape[0]
    mask2d = row_mask.expand(*lead_shape, N).reshape(-1, N)
    if rows == 0 or N == 0 or K == 0 or rows > MAX_DECODE_ROWS:
        out = torch.nn.functional.linear(x2d, weight)
        out = torch.where(mask2d, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out.reshape(*lead_shape, N)

    config = plan_launch("masked_rows", rows, K, N, x.dtype, x.device)
    out = _launch_masked_rows(x2d, weight, mask2d, config)
    return out.reshape(*lead_shape, N)


# --------------------------------------------------------------------------------------------
# Fused projections
# --------------------------------------------------------------------------------------------


def fuse_transposed_weights(weights: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Concatenate `[N_i, K]` weights (the usual nn.Linear layout) into one `[K, sum N_i]` weight_t.

    The layers must share their input, as q/k/v or gate/up projections do, so that one threshold
    vector and one pass over x serve all of them.
    """
    in_features = {w.shape[1] for w in weights}
    if len(in_features) != 1:
        raise ValueError(f"fused weights need the same input size; got in_features {sorted(in_features)}")
    return torch.cat([w.t() for w in weights], dim=1).contiguous()


def sparse_linear_split(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: torch.Tensor,
    split_sizes: list[int] | tuple[int, ...],
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Run one sparse_linear over a concatenated weight_t and split its output columns.

    Returns views of one output tensor, in the order of `split_sizes`.
    """
    if sum(split_sizes) != weight_t.shape[1]:
        raise ValueError(f"split_sizes {tuple(split_sizes)} add up to {sum(split_sizes)}, "
                         f"but weight_t has {weight_t.shape[1]} output columns")
    return torch.split(sparse_linear(x, weight_t, threshold, bias), list(split_sizes), dim=-1)


def sparse_linear_qkv(
    x: torch.Tensor,
    weight_t_qkv: torch.Tensor,
    threshold: torch.Tensor,
    sizes: tuple[int, int, int],
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute the q, k and v projections from one `[K, Nq + Nk + Nv]` weight_t in one launch."""
    q, k, v = sparse_linear_split(x, weight_t_qkv, threshold, sizes, bias)
    return q, k, v


def sparse_linear_gate_up(
    x: torch.Tensor,
    weight_t_gate_up: torch.Tensor,
    threshold: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the gate and up projections from one `[K, 2 * I]` weight_t (gate columns first)."""
    columns = weight_t_gate_up.shape[1]
    if columns % 2 != 0:
        raise ValueError(f"a gate/up weight_t needs an even number of columns; got {columns}")
    gate, up = sparse_linear_split(x, weight_t_gate_up, threshold, (columns // 2, columns // 2), bias)
    return gate, up
