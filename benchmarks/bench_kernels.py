"""Benchmark the moyu CPU sparse kernels against dense `torch.nn.functional.linear`.

The workload is one decoder MLP of SmolLM2-135M (hidden 576, intermediate 1536): gate and up are
[1536, 576], down is [576, 1536], with random weights. The dense MLP uses F.linear on the usual
[N, K] weights; the sparse MLP uses `moyu_kernels.cpu.sparse_linear` on the transposed [K, N]
copies, with thresholds set to the quantile of |input| that zeroes the requested fraction of
the gate/up input and of the down input.

Cache regimes:
- hot: the same layer's weights on every call (they stay in the last-level cache);
- cold: a sweep over --layers copies of the weights, larger than the last-level cache, which is
  what batch-1 decoding through a whole model does.

Every measurement alternates dense and sparse samples after a warm-up and reports medians.
The speedup is dense time / sparse time; the ideal is 1 / (1 - sparsity), the factor by which
the weight bytes read shrink.

Usage:
    python benchmarks/bench_kernels.py [--threads 2] [--layers 30] [--samples 15] [--crossover]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from moyu_kernels import cpu

HIDDEN = 576
INTERMEDIATE = 1536
SPARSITIES = (0.0, 0.25, 0.5, 0.7, 0.9)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Distinct decode inputs cycled through in the cold regime (coprime with the default 30 layers).
INPUTS = 7


class MlpWeights:
    """One gated MLP in both layouts: [N, K] for F.linear and [K, N] for sparse_linear."""

    def __init__(self, dtype: torch.dtype, generator: torch.Generator):
        def make(n: int, k: int) -> torch.Tensor:
            return (torch.randn(n, k, generator=generator) / k**0.5).to(dtype)

        self.gate = make(INTERMEDIATE, HIDDEN)
        self.up = make(INTERMEDIATE, HIDDEN)
        self.down = make(HIDDEN, INTERMEDIATE)
        self.gate_t = self.gate.t().contiguous()
        self.up_t = self.up.t().contiguous()
        self.down_t = self.down.t().contiguous()


def dense_mlp(x: torch.Tensor, w: MlpWeights) -> torch.Tensor:
    h = F.silu(F.linear(x, w.gate)) * F.linear(x, w.up)
    return F.linear(h, w.down)


def sparse_mlp(x: torch.Tensor, w: MlpWeights, threshold_in: torch.Tensor, threshold_mid: torch.Tensor) -> torch.Tensor:
    h = F.silu(cpu.sparse_linear(x, w.gate_t, threshold_in)) * cpu.sparse_linear(x, w.up_t, threshold_in)
    return cpu.sparse_linear(h, w.down_t, threshold_mid)


def quantile_threshold(values: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Return a per-channel threshold (all equal) that zeroes `sparsity` of `values`."""
    K = values.shape[-1]
    if sparsity <= 0.0:
        return torch.full((K,), -1.0)
    magnitudes = values.float().abs().flatten().sort().values
    cut = magnitudes[min(int(round(sparsity * magnitudes.numel())), magnitudes.numel()) - 1]
    return torch.full((K,), cut.item())


def time_call(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def compare(dense_fn, sparse_fn, repeats: int, samples: int) -> tuple[float, float]:
    """Return the median (dense, sparse) seconds per call, sampling them alternately."""
    for _ in range(3):
        dense_fn()
        sparse_fn()
    dense, sparse = [], []
    for _ in range(samples):
        dense.append(time_call(dense_fn, repeats))
        sparse.append(time_call(sparse_fn, repeats))
    return statistics.median(dense), statistics.median(sparse)


def bench_decode(dtype_name: str, layers: int, samples: int) -> None:
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(0)
    weights = [MlpWeights(dtype, generator) for _ in range(layers)]
    # Decoding feeds every layer a different input, so the active rows differ between calls. The
    # cold sweep pairs layer l with input (l + sweep) % INPUTS, so no (layer, input) pair repeats
    # within INPUTS sweeps and the sparse kernel cannot keep its active rows in the cache.
    inputs = [torch.randn(1, HIDDEN, generator=generator).to(dtype) for _ in range(INPUTS)]
    megabytes = sum(t.numel() * t.element_size() for t in (weights[0].gate, weights[0].up, weights[0].down)) / 2**20

    print(
        f"\n## Decode, batch 1, one MLP, {dtype_name}: {megabytes:.1f} MiB of weights per layer,"
        f" cold sweeps {layers} layers ({layers * megabytes:.0f} MiB per layout)"
    )
    print(f"{'sparsity':>8} {'mid sp.':>7} {'regime':>6} {'dense us':>9} {'sparse us':>9} {'speedup':>8} {'ideal':>6} {'of ideal':>8}")
    for sparsity in SPARSITIES:
        thresholds_in = [quantile_threshold(x, sparsity) for x in inputs]
        hidden = []
        for x, threshold_in in zip(inputs, thresholds_in):
            kept = torch.where(x.abs() > threshold_in.to(dtype), x, torch.zeros((), dtype=dtype))
            hidden.append(F.silu(F.linear(kept, weights[0].gate)) * F.linear(kept, weights[0].up))
        # One threshold for the down input, calibrated on layer 0 over all inputs.
        threshold_mid = quantile_threshold(torch.cat(hidden), sparsity)
        sweep = [0]

        def dense_hot():
            dense_mlp(inputs[0], weights[0])

        def sparse_hot():
            sparse_mlp(inputs[0], weights[0], thresholds_in[0], threshold_mid)

        def dense_cold():
            sweep[0] += 1
            for layer, w in enumerate(weights):
                dense_mlp(inputs[(layer + sweep[0]) % INPUTS], w)

        def sparse_cold():
            for layer, w in enumerate(weights):
                i = (layer + sweep[0]) % INPUTS
                sparse_mlp(inputs[i], w, thresholds_in[i], threshold_mid)

        mid_sparsity = measure_mid_sparsity(inputs, weights, thresholds_in, threshold_mid)
        ideal = 1.0 / (1.0 - sparsity)
        for regime, dense_fn, sparse_fn, repeats, calls in (
            ("hot", dense_hot, sparse_hot, 50, 1),
            ("cold", dense_cold, sparse_cold, 2, layers),
        ):
            dense_s, sparse_s = compare(dense_fn, sparse_fn, repeats, samples)
            speedup = dense_s / sparse_s
            print(
                f"{sparsity:>8.0%} {mid_sparsity:>7.0%} {regime:>6} {dense_s / calls * 1e6:>9.1f} {sparse_s / calls * 1e6:>9.1f}"
                f" {speedup:>7.2f}x {ideal:>5.2f}x {speedup / ideal:>8.0%}"
            )


def measure_mid_sparsity(inputs, weights: list[MlpWeights], thresholds_in, threshold_mid: torch.Tensor) -> float:
    """Return the mean fraction of down-projection inputs at or below threshold over all layers."""
    fractions = []
    for layer, w in enumerate(weights):
        for x, threshold_in in zip(inputs, thresholds_in):
            h = F.silu(cpu.sparse_linear(x, w.gate_t, threshold_in)) * cpu.sparse_linear(x, w.up_t, threshold_in)
            fractions.append((h.abs() <= threshold_mid.to(h.dtype)).float().mean().item())
    return statistics.mean(fractions)


def bench_prefill(samples: int) -> None:
    print("\n## Prefill: dense F.linear vs sparse_linear (dispatches to the dense matmul), 50% sparsity")
    print(f"{'dtype':>5} {'tokens':>6} {'weight [N,K]':>12} {'dense us':>9} {'sparse us':>9} {'dense/sparse':>12}")
    generator = torch.Generator().manual_seed(1)
    for dtype_name, dtype in DTYPES.items():
        for tokens in (128, 512):
            for n, k in ((INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)):
                weight = (torch.randn(n, k, generator=generator) / k**0.5).to(dtype)
                weight_t = weight.t().contiguous()
                x = torch.randn(tokens, k, generator=generator).to(dtype)
                threshold = quantile_threshold(x, 0.5)
                dense_s, sparse_s = compare(
                    lambda: F.linear(x, weight), lambda: cpu.sparse_linear(x, weight_t, threshold), 5, samples
                )
                print(
                    f"{dtype_name:>5} {tokens:>6} {f'[{n},{k}]':>12} {dense_s * 1e6:>9.1f} {sparse_s * 1e6:>9.1f}"
                    f" {dense_s / sparse_s:>11.2f}x"
                )


def bench_crossover(samples: int) -> None:
    """Time the sparse kernel against the dense matmul of the kept values for 2 to 8 rows."""
    print("\n## Batch 2-8 crossover: sparse kernel vs dense matmul of the kept values (hot weights)")
    print(f"{'dtype':>5} {'rows':>4} {'weight [K,N]':>12} {'union':>6} {'dense us':>9} {'sparse us':>9} {'dense/sparse':>12}")
    generator = torch.Generator().manual_seed(2)
    saved = cpu.MAX_ACTIVE_FRACTION, cpu.ALWAYS_SPARSE_ROWS
    cpu.ALWAYS_SPARSE_ROWS = 0
    try:
        for dtype_name, dtype in DTYPES.items():
            for k, n in ((HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)):
                weight_t = (torch.randn(k, n, generator=generator) / k**0.5).to(dtype)
                for rows in (2, 4, 8):
                    for union in (0.5, 0.7, 0.8, 0.9, 1.0):
                        # Channels in the union are active in row 0 and in each other row with
                        # probability 1/2; the others are below threshold in every row.
                        in_union = torch.rand(k, generator=generator) < union
                        active = torch.rand(rows, k, generator=generator) < 0.5
                        active[0] = True
                        active &= in_union
                        x = torch.where(active, 2.0, 0.5) * torch.randn(rows, k, generator=generator).sign()
                        x = x.to(dtype)
                        threshold = torch.ones(k)

                        def run_dense():
                            cpu.MAX_ACTIVE_FRACTION = 0.0
                            cpu.sparse_linear(x, weight_t, threshold)

                        def run_sparse():
                            cpu.MAX_ACTIVE_FRACTION = 1.0
                            cpu.sparse_linear(x, weight_t, threshold)

                        dense_s, sparse_s = compare(run_dense, run_sparse, 50, samples)
                        measured_union = in_union.float().mean().item()
                        print(
                            f"{dtype_name:>5} {rows:>4} {f'[{k},{n}]':>12} {measured_union:>6.0%} {dense_s * 1e6:>9.1f}"
                            f" {sparse_s * 1e6:>9.1f} {dense_s / sparse_s:>11.2f}x"
                        )
    finally:
        cpu.MAX_ACTIVE_FRACTION, cpu.ALWAYS_SPARSE_ROWS = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenMP threads (default 2)")
    parser.add_argument("--layers", type=int, default=30, help="MLP copies swept in the cold regime (default 30)")
    parser.add_argument("--samples", type=int, default=15, help="timed samples per measurement; medians are reported")
    parser.add_argument("--dtype", choices=["all", *DTYPES], default="all", help="decode dtypes to run")
    parser.add_argument("--skip-prefill", action="store_true", help="skip the prefill measurement")
    parser.add_argument("--crossover", action="store_true", help="also measure the batch 2-8 sparse/dense crossover")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cpu.ensure_built()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability"
        f" {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}"
    )
    for dtype_name in DTYPES if args.dtype == "all" else [args.dtype]:
        bench_decode(dtype_name, args.layers, args.samples)
    if not args.skip_prefill:
        bench_prefill(args.samples)
    if args.crossover:
        bench_crossover(args.samples)
    # Other processes on the machine distort the timings, most of all for the 2-thread runs.
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
