"""Statistics and threshold math against hand-computed values. CPU only: `pytest tests/test_observers.py`."""

import math

import pytest
import torch

from moyu_cli import observers
from moyu_cli.observers import (
    BINS_PER_OCTAVE,
    MIN_EXP,
    SiteStatistics,
    fraction_at_or_below,
    histogram_quantile,
    magnitude_bins,
    magnitude_histogram,
)

RELATIVE_BIN_WIDTH = 1 / BINS_PER_OCTAVE  # 0.39%: one mantissa step


def test_bins_of_powers_of_two():
    x = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5])
    bins = magnitude_bins(x)
    one = (0 - MIN_EXP) * BINS_PER_OCTAVE + 1
    assert bins[0] == 0
    assert bins[1] == one
    assert bins[2] == one
    assert bins[3] == one + BINS_PER_OCTAVE
    assert bins[4] == one - BINS_PER_OCTAVE


def test_bins_clamp_extremes():
    x = torch.tensor([1e-30, 1e30, float("inf"), 2.0**-24, 2.0**-24 * (1 + 1 / 256)])
    bins = magnitude_bins(x)
    assert bins.tolist() == [0, observers.NUM_BINS - 1, observers.NUM_BINS - 1, 1, 2]


def test_bins_within_an_octave():
    # 1.5 = 2**0 * (1 + 128/256): half way through the octave of 1.
    one = (0 - MIN_EXP) * BINS_PER_OCTAVE + 1
    assert int(magnitude_bins(torch.tensor([1.5]))[0]) == one + 128
    assert observers.bin_lower_edge(one + 128) == 1.5
    assert observers.bin_lower_edge(0) == 0.0


def test_quantile_of_hand_computed_values():
    # |x| = 1..100 (signs alternate). The exact 0.5-quantile lies between 50 and 51; the
    # 0.9-quantile between 90 and 91. The histogram result must fall in that gap, up to one bin.
    values = torch.arange(1, 101, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(50)
    counts = magnitude_histogram(values)
    assert counts.sum() == 100
    for q, low, high in [(0.5, 50, 51), (0.9, 90, 91), (0.25, 25, 26)]:
        t = histogram_quantile(counts, q)
        assert low * (1 - RELATIVE_BIN_WIDTH) <= t <= high * (1 + RELATIVE_BIN_WIDTH), (q, t)


def test_quantile_matches_torch_on_random_data():
    torch.manual_seed(0)
    x = torch.randn(200_000) * 3
    counts = magnitude_histogram(x)
    for q in (0.1, 0.25, 0.5, 0.7, 0.9, 0.99):
        exact = float(torch.quantile(x.abs()[:100_000].double(), q))  # torch.quantile caps input size
        exact_full = float(x.abs().sort().values[int(q * x.numel()) - 1])
        t = histogram_quantile(counts, q)
        assert abs(t - exact_full) / exact_full < 2 * RELATIVE_BIN_WIDTH, (q, t, exact_full, exact)


def test_quantile_zero_heavy_input():
    # 60% exact zeros: any quantile up to 0.6 is the zero threshold (zeros are always skipped).
    x = torch.cat([torch.zeros(600), torch.linspace(0.1, 1.0, 400)])
    counts = magnitude_histogram(x)
    assert histogram_quantile(counts, 0.5) == 0.0
    assert histogram_quantile(counts, 0.6) == 0.0
    assert histogram_quantile(counts, 0.8) > 0.1


def test_quantile_rejects_bad_arguments():
    counts = magnitude_histogram(torch.ones(10))
    with pytest.raises(ValueError, match="outside"):
        histogram_quantile(counts, 1.5)
    with pytest.raises(ValueError, match="empty"):
        histogram_quantile(torch.zeros_like(counts), 0.5)


def test_fraction_inverts_quantile():
    torch.manual_seed(1)
    counts = magnitude_histogram(torch.randn(50_000))
    for q in (0.2, 0.5, 0.8):
        t = histogram_quantile(counts, q)
        assert math.isclose(fraction_at_or_below(counts, t), q, abs_tol=1e-3)


def test_site_statistics_sums():
    stats = SiteStatistics(3)
    stats.update(torch.tensor([[1.0, -2.0, 0.0], [3.0, 2.0, -1.0]]))
    stats.update(torch.tensor([[[1.0, 1.0, 1.0]]]))
    assert stats.count == 3
    assert stats.abs_sum.tolist() == [5.0, 5.0, 2.0]
    assert stats.square_sum.tolist() == [11.0, 9.0, 2.0]
    assert stats.histogram.sum() == 9


def test_site_statistics_rejects_nan():
    stats = SiteStatistics(2)
    with pytest.raises(FloatingPointError):
        stats.update(torch.tensor([[1.0, float("nan")]]))


def test_site_statistics_round_trip():
    stats = SiteStatistics(4)
    stats.update(torch.randn(10, 4))
    again = SiteStatistics.from_state(stats.state("s"), "s")
    assert torch.equal(again.histogram, stats.histogram)
    assert torch.equal(again.abs_sum, stats.abs_sum)
    assert again.count == stats.count
