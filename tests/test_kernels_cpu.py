"""Check the C++/OpenMP CPU kernels (`moyu_kernels.cpu`) against the torch reference.

Covers `sparse_linear` for 1 to 8 rows (the sparse kernel and its dense fallback for large
active-channel unions) and for prefill-sized inputs (the dense dispatch), in fp32 and bf16. The
cases include sizes that are and are not multiples of the kernel's cache-line and row blocks,
sparsity 0 to 0.99, all-zero input, per-channel thresholds, bias, leading dimensions,
non-contiguous input and 1 to 3 threads. `masked_rows_linear` is checked for one row (the kernel)
and several rows (the reference fallback).

Needs only a CPU with a C++ compiler and ninja. The extension is built on first use (about half a
minute, then cached); when it cannot be built the tests fail with the build error instead of
being skipped.
"""

from __future__ import annotations

import pytest
import torch

from moyu_kernels import cpu, reference

# Inputs are N(0, 1) and weights N(0, 1/K), so outputs are O(1). fp32 differs from the reference
# only in summation order. bf16 outputs are rounded to bf16 (relative step 2**-8), and the dense
# fallback can round twice (the product, then the bias add).
TOLERANCE = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2},
}

# (K, N): multiples of the 64-byte line (16 fp32 / 32 bf16 values) and the 4-row step, and not.
SHAPES = [(576, 1536), (1536, 576), (37, 61), (5, 3), (130, 47), (1, 1)]
SPARSITIES = [0.0, 0.5, 0.9, 0.99]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def built_extension():
    # A failing build raises here, which fails every test in the module with the reason.
    return cpu.ensure_built()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, context: str) -> None:
    assert actual.dtype == expected.dtype, f"{context}: dtype {actual.dtype} != reference {expected.dtype}"
    assert actual.shape == expected.shape, f"{context}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    tol = TOLERANCE[dtype]
    error = (actual.float() - expected.float()).abs()
    allowed = tol["atol"] + tol["rtol"] * expected.float().abs()
    max_error = error.max().item() if error.numel() else 0.0
    mean_error = error.mean().item() if error.numel() else 0.0
    assert bool((error <= allowed).all()), (
        f"{context}: max abs error {max_error:.3g}, mean abs error {mean_error:.3g}, "
        f"tolerance atol {tol['atol']} + rtol {tol['rtol']} * |reference|"
    )


def make_case(rows: int, K: int, N: int, sparsity: float, dtype: torch.dtype, seed: int):
    """Return x [rows, K], weight [N, K] and a uniform threshold that zeroes `sparsity` of x."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=generator).to(dtype)
    weight = (torch.randn(N, K, generator=generator) / K**0.5).to(dtype)
    magnitudes = x.float().abs().flatten().sort().values
    if sparsity == 0.0:
        cut = -1.0
    else:
        index = max(int(round(sparsity * magnitudes.numel())) - 1, 0)
        cut = magnitudes[index].item()
    threshold = torch.full((K,), cut, dtype=torch.float32)
    return x, weight, threshold


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("K,N", SHAPES)
def test_sparse_linear_matches_reference(dtype, K, N):
    for rows in range(1, 9):
        for sparsity in SPARSITIES:
            x, weight, threshold = make_case(rows, K, N, sparsity, dtype, seed=rows * 100 + int(sparsity * 100))
            weight_t = weight.t().contiguous()
            actual = cpu.sparse_linear(x, weight_t, threshold)
            expected = reference.sparse_linear(x, weight_t, threshold)
            assert_close(actual, expected, dtype, f"{dtype} K={K} N={N} rows={rows} sparsity={sparsity}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_sparse_linear_reads_only_active_rows(dtype):
    # Poison the weight rows of the inactive channels with NaN: any read of them would show up
    # in the output, because NaN * 0 is NaN.
    K, N = 133, 77
    x, weight, threshold = make_case(1, K, N, 0.9, dtype, seed=7)
    weight_t = weight.t().contiguous()
    inactive = x[0].float().abs() <= threshold
    assert 0 < int((~inactive).sum()) < K
    weight_t[inactive] = float("nan")
    actual = cpu.sparse_linear(x, weight_t, threshold)
    assert not bool(actual.isnan().any()), "the kernel read the weight rows of inactive channels"
    expected = reference.sparse_linear(x, torch.nan_to_num(weight_t, nan=0.0), threshold)
    assert_close(actual, expected, dtype, f"{dtype} with NaN in inactive rows")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_sparse_linear_thread_counts(dtype):
    # The kernel splits the columns (large N) or the active rows (small N) between the threads;
    # 3 threads give uneven splits on every machine, however many cores it has.
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for K, N in ((1536, 576), (576, 1536), (2000, 40), (300, 4100)):
                for rows in (1, 3):
                    x, weight, threshold = make_case(rows, K, N, 0.5, dtype, seed=threads * 10 + rows)
                    weight_t = weight.t().contiguous()
                    actual = cpu.sparse_linear(x, weight_t, threshold)
                    expected = reference.sparse_linear(x, weight_t, threshold)
                    assert_close(actual, expected, dtype, f"{dtype} threads={threads} K={K} N={N} rows={rows}")
                # weight_t [K, N] doubles as a masked_rows_linear weight with K outputs.
                mask = torch.rand(K) < 0.4
                x_row = torch.randn(N).to(dtype)
                actual = cpu.masked_rows_linear(x_row, weight_t, mask)
                expected = reference.masked_rows_linear(x_row, weight_t, mask)
                assert_close(actual, expected, dtype, f"{dtype} masked rows threads={threads} N={K} K={N}")
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_sparse_linear_all_zero_input(dtype):
    K, N = 96, 50
    weight_t = torch.randn(K, N).to(dtype)
    bias = torch.randn(N)
    for rows in (1, 4, 20):
        x = torch.zeros(rows, K, dtype=dtype)
        threshold = torch.zeros(K)
        actual = cpu.sparse_linear(x, weight_t, threshold)
        assert bool((actual == 0).all()), f"rows={rows}: all-zero input gave nonzero output"
        with_bias = cpu.sparse_linear(x, weight_t, threshold, bias)
        assert_close(with_bias, reference.sparse_linear(x, weight_t, threshold, bias), dtype, f"rows={rows} bias only")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_sparse_linear_per_channel_threshold(dtype):
    # A dense core (threshold -1 keeps every value), channels that are always off (threshold
    # above every value), and random per-channel thresholds in between.
    K, N = 200, 130
    generator = torch.Generator().manual_seed(3)
    threshold = torch.rand(K, generator=generator) * 1.5
    threshold[:20] = -1.0
    threshold[20:40] = 1e9
    weight_t = (torch.randn(K, N, generator=generator) / K**0.5).to(dtype)
    for rows in (1, 2, 5, 8):
        x = torch.randn(rows, K, generator=generator).to(dtype)
        actual = cpu.sparse_linear(x, weight_t, threshold)
        expected = reference.sparse_linear(x, weight_t, threshold)
        assert_close(actual, expected, dtype, f"{dtype} per-channel thresholds rows={rows}")


def test_sparse_linear_bf16_threshold_rounding():
    # The reference compares |x| with the threshold rounded to bf16. Channel 0's threshold
    # 1.0078125 - 2**-10 rounds up to 1.0078125, so x = 1.0078125 is dropped, although it is
    # above the float32 threshold. Channel 1 is kept.
    threshold = torch.tensor([1.0078125 - 2**-10, 0.5])
    x = torch.tensor([[1.0078125, 1.0]], dtype=torch.bfloat16)
    weight_t = torch.tensor([[1.0, 2.0], [4.0, 8.0]], dtype=torch.bfloat16)
    expected = reference.sparse_linear(x, weight_t, threshold)
    assert expected.tolist() == [[4.0, 8.0]], "the reference semantics changed; update this test"
    for rows in (x, x.expand(3, 2), x.expand(20, 2)):
        actual = cpu.sparse_linear(rows, weight_t, threshold)
        assert actual.tolist() == [[4.0, 8.0]] * rows.shape[0], f"rows={rows.shape[0]}: got {actual.tolist()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_sparse_linear_bias_and_leading_dims(dtype):
    K, N = 48, 33
    x, weight, threshold = make_case(6, K, N, 0.5, dtype, seed=11)
    weight_t = weight.t().contiguous()
    bias = torch.randn(N, dtype=dtype)
    for shape in ((K,), (1, 1, K), (2, 3, K)):
        rows = x.reshape(-1, K)[: torch.Size(shape[:-1]).numel()].reshape(shape)
        actual = cpu.sparse_linear(rows, weight_t, threshold, bias)
        expected = reference.sparse_linear(rows, weight_t, threshold, bias)
        assert_close(actual, expected, dtype, f"{dtype} x shape {shape} with bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_sparse_linear_non_contiguous_input(dtype):
    K, N = 70, 40
    generator = torch.Generator().manual_seed(5)
    wide = torch.randn(3, 2 * K, generator=generator).to(dtype)
    x = wide[:, ::2]
    assert not x.is_contiguous()
    weight_t = (torch.randn(K, N, generator=generator) / K**0.5).to(dtype)
    threshold = torch.full((K,), 0.6)
    for rows in (x[:1], x):
        actual = cpu.sparse_linear(rows, weight_t, threshold)
        expected = reference.sparse_linear(rows, weight_t, threshold)
        assert_close(actual, expected, dtype, f"{dtype} strided x rows={rows.shape[0]}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_sparse_linear_prefill_dispatch(dtype):
    K, N = 96, 80
    bias = torch.randn(N)
    for tokens in (9, 64):
        x, weight, threshold = make_case(tokens, K, N, 0.5, dtype, seed=tokens)
        weight_t = weight.t().contiguous()
        actual = cpu.sparse_linear(x.reshape(1, tokens, K), weight_t, threshold, bias)
        expected = reference.sparse_linear(x.reshape(1, tokens, K), weight_t, threshold, bias)
        assert_close(actual, expected, dtype, f"{dtype} prefill tokens={tokens}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_sparse_linear_batch_union_fallback(dtype):
    # The same rows through the sparse kernel (no fallback) and the dense fallback (always).
    K, N = 160, 90
    rows = cpu.ALWAYS_SPARSE_ROWS + 1
    assert rows <= cpu.MAX_SPARSE_ROWS
    x, weight, threshold = make_case(rows, K, N, 0.5, dtype, seed=13)
    weight_t = weight.t().contiguous()
    expected = reference.sparse_linear(x, weight_t, threshold)
    saved = cpu.MAX_ACTIVE_FRACTION
    try:
        for fraction in (0.0, 1.0):
            cpu.MAX_ACTIVE_FRACTION = fraction
            actual = cpu.sparse_linear(x, weight_t, threshold)
            assert_close(actual, expected, dtype, f"{dtype} MAX_ACTIVE_FRACTION={fraction}")
    finally:
        cpu.MAX_ACTIVE_FRACTION = saved


def test_sparse_linear_other_dtypes_use_reference():
    K, N = 24, 16
    x, weight, threshold = make_case(2, K, N, 0.5, torch.float32, seed=17)
    for dtype in (torch.float16, torch.float64):
        x_typed, weight_t = x.to(dtype), weight.t().contiguous().to(dtype)
        actual = cpu.sparse_linear(x_typed, weight_t, threshold)
        expected = reference.sparse_linear(x_typed, weight_t, threshold)
        assert torch.equal(actual, expected), f"{dtype}: result differs from the reference"


def test_sparse_linear_rejects_wrong_shapes():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight_t must be"):
        cpu.sparse_linear(x, torch.randn(7, 4), torch.zeros(8))
    with pytest.raises(ValueError, match="threshold must have"):
        cpu.sparse_linear(x, torch.randn(8, 4), torch.zeros(7))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("K,N", [(576, 1536), (1536, 576), (37, 61), (3, 5), (1, 1)])
def test_masked_rows_linear_matches_reference(dtype, K, N):
    generator = torch.Generator().manual_seed(K * 7 + N)
    weight = (torch.randn(N, K, generator=generator) / K**0.5).to(dtype)
    for rows in (1, 3):
        x = torch.randn(rows, K, generator=generator).to(dtype)
        for active in (0.0, 0.1, 0.5, 1.0):
            row_mask = torch.rand(rows, N, generator=generator) < active
            actual = cpu.masked_rows_linear(x, weight, row_mask)
            expected = reference.masked_rows_linear(x, weight, row_mask)
            assert_close(actual, expected, dtype, f"{dtype} K={K} N={N} rows={rows} active={active}")
            assert bool((actual[~row_mask] == 0).all()), "unselected output rows must be zero"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_masked_rows_linear_reads_only_selected_rows(dtype):
    K, N = 90, 70
    generator = torch.Generator().manual_seed(19)
    weight = torch.randn(N, K, generator=generator).to(dtype)
    row_mask = torch.rand(N, generator=generator) < 0.3
    weight[~row_mask] = float("nan")
    x = torch.randn(K, generator=generator).to(dtype)
    actual = cpu.masked_rows_linear(x, weight, row_mask)
    assert not bool(actual.isnan().any()), "the kernel read unselected weight rows"
    expected = reference.masked_rows_linear(x, torch.nan_to_num(weight, nan=0.0), row_mask)
    assert_close(actual, expected, dtype, f"{dtype} with NaN in unselected rows")
