"""Time the Triton sparse_linear kernel against dense torch.nn.functional.linear on a CUDA GPU.

For a hidden x intermediate layer pair (default 4096 x 14336) it times both orientations:
up-like (intermediate outputs, hidden inputs) and down-like (hidden outputs, intermediate inputs),
for each dtype, batch size and sparsity. Each row prints the dense and sparse medians, the
speedup, the ideal 1/(1-s) bound, the bound from the channels actually read (the union of kept
channels over the batch rows) and the fraction of that bound reached.

Timing uses CUDA events around one call, after warm-up, with the L2 cache flushed before every
call, and reports medians. Before timing, each case checks the sparse output against the torch
reference and marks a mismatch.

    python benchmarks/bench_triton.py                 # full run, needs a CUDA GPU
    python benchmarks/bench_triton.py --dry-run       # CPU, Triton interpreter, tiny shapes

--dry-run only checks that the script runs end to end: its timings are interpreter timings
and mean nothing for a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# Max abs error allowed against the float32 reference, relative to the output's max magnitude.
RELATIVE_TOLERANCE = {"fp16": 5e-3, "bf16": 3e-2, "fp32": 1e-4}
TARGET_FRACTION = 0.9
L2_FLUSH_BYTES = 256 * 1024 * 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (layer input of up, output of down)")
    parser.add_argument("--intermediate", type=int, default=14336, help="intermediate size of the MLP")
    parser.add_argument("--dtypes", default="fp16,bf16", help="comma-separated list of fp16, bf16, fp32")
    parser.add_argument("--batches", default="1,2,4,8", help="comma-separated batch sizes (rows per call, 1-8)")
    parser.add_argument("--sparsities", default="0,0.5,0.7,0.9", help="comma-separated fractions of x entries dropped")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before timing each case")
    parser.add_argument("--reps", type=int, default=50, help="timed calls per case; the median is reported")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights and activations")
    parser.add_argument("--dry-run", action="store_true",
                        help="run on CPU under TRITON_INTERPRET=1 with a 64 x 96 layer and 2 reps, to check the script")
    args = parser.parse_args()
    if args.dry_run:
        args.hidden, args.intermediate, args.warmup, args.reps = 64, 96, 1, 2
    return args


class Timer:
    """Median time of one call in microseconds: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, torch_module, device: str, warmup: int, reps: int):
        self.torch = torch_module
        self.device = device
        self.warmup = warmup
        self.reps = reps
        self.flush_buffer = None
        if device == "cuda":
            self.flush_buffer = torch_module.empty(L2_FLUSH_BYTES, dtype=torch_module.uint8, device=device)

    def median_us(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device == "cuda":
            torch = self.torch
            torch.cuda.synchronize()
            for _ in range(self.reps):
                # The flush also keeps the GPU busy while Python launches fn, so the events time the
                # kernels and not the host launch overhead (256 MiB is an estimated 60 us of GPU work).
                self.flush_buffer.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1000.0)
        else:
            for _ in range(self.reps):
                start_s = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start_s) * 1e6)
        return statistics.median(times)


def make_threshold(torch, x, sparsity: float):
    """Return a uniform threshold [K] that drops about `sparsity` of the entries of x."""
    K = x.shape[-1]
    if sparsity <= 0.0:
        return torch.full((K,), -1.0, device=x.device)
    level = torch.quantile(x.abs().float().flatten(), sparsity).item()
    return torch.full((K,), level, device=x.device)


def run_case(torch, kernels, reference, timer, weight, weight_t, x, threshold, dtype_name):
    """Time dense and sparse for one case; return a dict of the measured values."""
    functional = torch.nn.functional
    kept = x.abs() > threshold.to(x.dtype)
    row_density = kept.float().mean().item()
    union_density = kept.any(dim=0).float().mean().item()

    sparse_out = kernels.sparse_linear(x, weight_t, threshold)
    # The reference rounds the threshold to the dtype of x and accumulates in float32.
    expected = reference.sparse_linear(x, weight_t, threshold).float()
    error = (sparse_out.float() - expected).abs().max().item()
    scale = expected.abs().max().item() or 1.0
    matches = error <= RELATIVE_TOLERANCE[dtype_name] * scale

    dense_us = timer.median_us(lambda: functional.linear(x, weight))
    sparse_us = timer.median_us(lambda: kernels.sparse_linear(x, weight_t, threshold))
    return {
        "dense_us": dense_us,
        "sparse_us": sparse_us,
        "speedup": dense_us / sparse_us,
        "row_density": row_density,
        "union_density": union_density,
        "union_bound": 1.0 / max(union_density, 1e-9),
        "error": error,
        "matches": matches,
    }


def main() -> int:
    args = parse_args()
    if args.dry_run:
        # Must be set before triton is imported.
        os.environ["TRITON_INTERPRET"] = "1"

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench_triton.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "use --dry-run to check the script under the Triton interpreter")
    try:
        from moyu_kernels import reference
        from moyu_kernels import triton_kernels as kernels

        kernels.ensure_available()
    except (ImportError, RuntimeError) as exc:
        sys.exit(f"bench_triton.py cannot load the triton kernels: {exc}")
    import triton

    device = "cpu" if args.dry_run else "cuda"
    batches = [int(value) for value in args.batches.split(",")]
    if not all(1 <= batch <= kernels.MAX_DECODE_ROWS for batch in batches):
        sys.exit(f"--batches must be between 1 and {kernels.MAX_DECODE_ROWS}; got {args.batches}")
    sparsities = [float(value) for value in args.sparsities.split(",")]
    dtype_names = args.dtypes.split(",")
    unknown = [name for name in dtype_names if name not in DTYPE_NAMES]
    if unknown:
        sys.exit(f"unknown --dtypes {unknown}; choose from {', '.join(DTYPE_NAMES)}")

    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {device_name}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"layer: hidden {args.hidden}, intermediate {args.intermediate}; medians of {args.reps} calls "
          f"after {args.warmup} warm-up calls" + ("; L2 flushed before each call" if device == "cuda" else ""))
    if args.dry_run:
        print("dry run: interpreter timings, not GPU performance")

    timer = Timer(torch, device, args.warmup, args.reps)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    header = (f"{'layer':<6} {'dtype':<5} {'batch':>5} {'sparsity':>8} {'dense us':>9} {'sparse us':>9} "
              f"{'speedup':>7} {'1/(1-s)':>7} {'union':>6} {'bound':>6} {'reached':>7} {'max err':>8}")
    print(header)
    mismatches = []
    target_rows = []
    orientations = [("up", args.intermediate, args.hidden), ("down", args.hidden, args.intermediate)]
    for layer, out_features, in_features in orientations:
        for dtype_name in dtype_names:
            dtype = getattr(torch, DTYPE_NAMES[dtype_name])
            weight = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5)
            weight = weight.to(device, dtype)
            weight_t = weight.t().contiguous()
            for batch in batches:
                x = torch.randn(batch, in_features, generator=generator).to(device, dtype)
                for sparsity in sparsities:
                    threshold = make_threshold(torch, x, sparsity)
                    result = run_case(torch, kernels, reference, timer, weight, weight_t, x, threshold, dtype_name)
                    nominal_bound = 1.0 / (1.0 - sparsity) if sparsity < 1.0 else float("inf")
                    reached = result["speedup"] / result["union_bound"]
                    flag = "" if result["matches"] else "  MISMATCH"
                    print(f"{layer:<6} {dtype_name:<5} {batch:>5} {sparsity:>8.2f} {result['dense_us']:>9.1f} "
                          f"{result['sparse_us']:>9.1f} {result['speedup']:>7.2f} {nominal_bound:>7.2f} "
                          f"{result['union_density']:>6.2f} {result['union_bound']:>6.2f} {reached:>7.2f} "
                          f"{result['error']:>8.2g}{flag}", flush=True)
                    if not result["matches"]:
                        mismatches.append((layer, dtype_name, batch, sparsity))
                    if batch == 1 and sparsity == 0.5:
                        target_rows.append((layer, dtype_name, reached))
            del weight, weight_t

    print("columns: union = fraction of channels kept by at least one batch row (the weight rows read); "
          "bound = 1/union; reached = speedup / bound")
    for layer, dtype_name, reached in target_rows:
        verdict = "meets" if reached >= TARGET_FRACTION else "misses"
        print(f"target: {layer} {dtype_name} batch 1 at 50% sparsity reaches {reached:.2f} of the bound, "
              f"{verdict} the {TARGET_FRACTION:.0%} target" + (" (dry run: not a GPU figure)" if args.dry_run else ""))
    if mismatches:
        print(f"error: {len(mismatches)} cases differ from the torch reference beyond tolerance: {mismatches}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
