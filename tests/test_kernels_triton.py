"""Check the Triton kernels (`moyu_kernels.triton_kernels`) against the torch reference.

Needs the `triton` package, and skips only when it is not installed. Without a CUDA device the
tests set TRITON_INTERPRET=1 before triton is imported, so the kernels run in the Triton
interpreter on CPU tensors. That covers the kernel logic (masks, tails, split-K reduction,
batch union) but not GPU memory ordering or speed. The interpreter (triton 3.9.0) has two known
gaps. Its `tl.dot` is wrong for bfloat16, so the backend runs bfloat16 batches of 2-8 rows on the
broadcast path there. Its float32 to bfloat16 cast truncates, so bfloat16 outputs may differ from
torch by one more unit in the last place.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="the triton package is not installed (pip install 'moyu[gpu]')")

from moyu_kernels import reference  # noqa: E402
from moyu_kernels import triton_kernels as tk  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

# (atol, rtol) against the float32 reference, for outputs of magnitude about 1.
TOLERANCE = {
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float32: (2e-5, 2e-5),
}
DTYPES = list(TOLERANCE)
# (K, N): one pair of multiples of the interpreter tile sizes (16 channels, 32 columns), one not.
SHAPES = [(64, 96), (70, 45)]
SPARSITIES = [0.0, 0.5, 0.9, 0.99]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, case: str) -> None:
    atol, rtol = TOLERANCE[dtype]
    assert actual.shape == expected.shape, f"{case}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{case}: dtype {actual.dtype} != {expected.dtype}"
    error = (actual.float() - expected.float()).abs()
    limit = atol + rtol * expected.float().abs()
    assert bool((error <= limit).all()), (
        f"{case}: max abs error {error.max().item():.3g}, mean abs error {error.mean().item():.3g} "
        f"(atol {atol}, rtol {rtol})"
    )


def make_inputs(rows: int, K: int, N: int, sparsity: float, dtype: torch.dtype, seed: int = 0):
    """Return x [rows, K], weight_t [K, N], threshold [K] and bias [N] that drop about `sparsity` of x."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=generator)
    weight_t = torch.randn(K, N, generator=generator) / K**0.5
    bias = torch.randn(N, generator=generator)
    if sparsity == 0.0:
        threshold = torch.full((K,), -1.0)
    else:
        # A per-channel spread around the quantile, so that channels differ in how often they are kept.
        level = torch.quantile(x.abs().flatten(), sparsity).item()
        threshold = level * (0.8 + 0.4 * torch.rand(K, generator=generator))
    return (x.to(DEVICE, dtype), weight_t.to(DEVICE, dtype), threshold.to(DEVICE),
            bias.to(DEVICE, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_sparse_linear_matches_reference(dtype, rows):
    for K, N in SHAPES:
        for sparsity in SPARSITIES:
            x, weight_t, threshold, bias = make_inputs(rows, K, N, sparsity, dtype)
            use_bias = sparsity in (0.0, 0.9)
            bias_arg = bias if use_bias else None
            case = f"{dtype} rows={rows} K={K} N={N} sparsity={sparsity} bias={use_bias}"
            actual = tk.sparse_linear(x, weight_t, threshold, bias_arg)
            expected = reference.sparse_linear(x, weight_t, threshold, bias_arg)
            assert_close(actual, expected, dtype, case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_linear_keeps_exact_mask(dtype):
    # An identity weight returns the kept entries of x, so any mask difference is visible exactly.
    K = 48
    threshold = torch.full((K,), 0.3, device=DEVICE)  # 0.3 is not exact in any of these dtypes
    rounded = threshold.to(dtype)
    unit = torch.finfo(dtype).eps * 0.3
    values = torch.stack([rounded.float() - unit, rounded.float(), rounded.float() + unit,
                          torch.tensor(0.3, device=DEVICE).expand(K), -rounded.float()])
    x = values[:, :K].to(dtype)
    weight_t = torch.eye(K, dtype=dtype, device=DEVICE)
    actual = tk.sparse_linear(x, weight_t, threshold)
    expected = reference.sparse_linear(x, weight_t, threshold)
    mismatched = (actual != expected).nonzero().tolist()
    assert not mismatched, f"{dtype}: kept entries differ from the reference at (row, channel) {mismatched[:5]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_linear_all_zero_input(dtype):
    K, N = 70, 45
    _, weight_t, _, bias = make_inputs(3, K, N, 0.5, dtype)
    x = torch.zeros(3, K, dtype=dtype, device=DEVICE)
    for threshold_value in (0.0, -1.0):
        threshold = torch.full((K,), threshold_value, device=DEVICE)
        actual = tk.sparse_linear(x, weight_t, threshold, bias)
        assert torch.equal(actual, bias.expand(3, N)), f"{dtype} threshold {threshold_value}: output is not the bias"
        actual = tk.sparse_linear(x, weight_t, threshold)
        assert not actual.any(), f"{dtype} threshold {threshold_value}: output of a zero input is not zero"


@pytest.mark.parametrize("split_k", [1, 3, 5])
def test_sparse_linear_split_k(split_k):
    dtype = torch.float16
    K, N = 70, 45
    x, weight_t, threshold, bias = make_inputs(2, K, N, 0.5, dtype)
    block_m = 16 if DEVICE == "cuda" else 2
    config = tk.LaunchConfig(block_m=block_m, block_n=32, block_k=16, split_k=split_k, use_dot=DEVICE == "cuda")
    actual = tk._launch_sparse_linear(x, weight_t, threshold, bias, config)
    expected = reference.sparse_linear(x, weight_t, threshold, bias)
    assert_close(actual, expected, dtype, f"split_k={split_k}")
    counters = tk._arrival_counters(x.device, 1)
    assert not counters.any(), f"split_k={split_k}: arrival counters were not reset to zero"


def test_sparse_linear_strided_weight():
    dtype = torch.float16
    K, N = 70, 45
    x, weight_t, threshold, bias = make_inputs(1, K, 2 * N, 0.5, dtype)
    strided = weight_t[:, ::2]  # stride 2 along N
    actual = tk.sparse_linear(x, strided, threshold, bias[:N])
    expected = reference.sparse_linear(x, strided, threshold, bias[:N])
    assert_close(actual, expected, dtype, "weight_t with stride 2 along N")


def test_sparse_linear_leading_dims():
    dtype = torch.bfloat16
    x, weight_t, threshold, bias = make_inputs(6, 70, 45, 0.5, dtype)
    x3d = x.reshape(2, 3, 70)
    actual = tk.sparse_linear(x3d, weight_t, threshold, bias)
    expected = reference.sparse_linear(x3d, weight_t, threshold, bias)
    assert_close(actual, expected, dtype, "x [2, 3, K]")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_linear_prefill_rows(dtype):
    rows = tk.MAX_DECODE_ROWS + 5
    x, weight_t, threshold, bias = make_inputs(rows, 70, 45, 0.5, dtype)
    actual = tk.sparse_linear(x, weight_t, threshold, bias)
    expected = reference.sparse_linear(x, weight_t, threshold, bias)
    assert_close(actual, expected, dtype, f"{rows} rows (dense path)")


def test_sparse_linear_unsupported_dtype_falls_back():
    x, weight_t, threshold, bias = make_inputs(2, 70, 45, 0.5, torch.float32)
    actual = tk.sparse_linear(x.double(), weight_t.double(), threshold, bias.double())
    expected = reference.sparse_linear(x.double(), weight_t.double(), threshold, bias.double())
    assert actual.dtype == torch.float64, f"dtype {actual.dtype}"
    assert torch.allclose(actual, expected), "float64 fallback differs from the reference"


def test_sparse_linear_rejects_bad_threshold():
    x, weight_t, _, _ = make_inputs(1, 70, 45, 0.5, torch.float16)
    with pytest.raises(ValueError, match="threshold must have shape"):
        tk.sparse_linear(x, weight_t, torch.zeros(69, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_masked_rows_matches_reference(dtype, rows):
    generator = torch.Generator().manual_seed(1)
    for K, N in SHAPES:
        x = torch.randn(rows, K, generator=generator).to(DEVICE, dtype)
        weight = (torch.randn(N, K, generator=generator) / K**0.5).to(DEVICE, dtype)
        for sparsity in SPARSITIES:
            row_mask = (torch.rand(rows, N, generator=generator) >= sparsity).to(DEVICE)
            case = f"{dtype} rows={rows} K={K} N={N} mask sparsity={sparsity}"
            actual = tk.masked_rows_linear(x, weight, row_mask)
            expected = reference.masked_rows_linear(x, weight, row_mask)
            assert_close(actual, expected, dtype, case)
            assert not actual[~row_mask].any(), f"{case}: unselected rows are not zero"


def test_masked_rows_prefill_and_leading_dims():
    dtype = torch.float16
    generator = torch.Generator().manual_seed(2)
    for lead in [(2, 3), (3, tk.MAX_DECODE_ROWS)]:
        x = torch.randn(*lead, 70, generator=generator).to(DEVICE, dtype)
        weight = (torch.randn(45, 70, generator=generator) / 70**0.5).to(DEVICE, dtype)
        row_mask = (torch.rand(*lead, 45, generator=generator) > 0.5).to(DEVICE)
        actual = tk.masked_rows_linear(x, weight, row_mask)
        expected = reference.masked_rows_linear(x, weight, row_mask)
        assert_close(actual, expected, dtype, f"x {lead + (70,)}")


def test_fused_qkv_matches_separate_layers():
    dtype = torch.float16
    K = 64
    sizes = (64, 32, 32)
    generator = torch.Generator().manual_seed(3)
    weights = [(torch.randn(n, K, generator=generator) / K**0.5).to(DEVICE, dtype) for n in sizes]
    x = torch.randn(2, K, generator=generator).to(DEVICE, dtype)
    threshold = torch.full((K,), 0.5, device=DEVICE)
    fused = tk.fuse_transposed_weights(weights)
    assert fused.shape == (K, sum(sizes)), f"fused weight_t shape {tuple(fused.shape)}"
    outputs = tk.sparse_linear_qkv(x, fused, threshold, sizes)
    for name, output, weight in zip("qkv", outputs, weights):
        expected = reference.sparse_linear(x, weight.t(), threshold)
        assert_close(output, expected, dtype, f"fused {name}")


def test_fused_gate_up_matches_separate_layers():
    dtype = torch.bfloat16
    K, intermediate = 64, 48
    generator = torch.Generator().manual_seed(4)
    gate_w, up_w = [(torch.randn(intermediate, K, generator=generator) / K**0.5).to(DEVICE, dtype) for _ in range(2)]
    x = torch.randn(1, K, generator=generator).to(DEVICE, dtype)
    threshold = torch.full((K,), 0.7, device=DEVICE)
    gate, up = tk.sparse_linear_gate_up(x, tk.fuse_transposed_weights([gate_w, up_w]), threshold)
    assert_close(gate, reference.sparse_linear(x, gate_w.t(), threshold), dtype, "fused gate")
    assert_close(up, reference.sparse_linear(x, up_w.t(), threshold), dtype, "fused up")


def test_fused_split_rejects_wrong_sizes():
    x, weight_t, threshold, _ = make_inputs(1, 64, 96, 0.5, torch.float16)
    with pytest.raises(ValueError, match="add up to"):
        tk.sparse_linear_qkv(x, weight_t, threshold, (64, 16, 8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on a machine without CUDA")
def test_ensure_available_without_cuda():
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = "from moyu_kernels import triton_kernels as tk; tk.ensure_available()"
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0, "ensure_available() did not raise without CUDA or TRITON_INTERPRET"
    assert "RuntimeError: no CUDA device is available" in result.stderr, result.stderr[-500:]
