"""Streaming activation statistics: magnitude histograms and per-channel moments.

Memory stays constant in the number of calibration tokens: each observed site keeps one
histogram of |x| over log-spaced bins plus per-channel sums, never the activations themselves.

Histogram bins come straight from the float32 bit pattern: the 8 exponent bits and the top 8
mantissa bits of |x| form the bin key, so binning is one integer shift per entry. Bin 0 counts
|x| < 2**MIN_EXP (zeros included); bin i >= 1 covers one 1/256 step of the mantissa in one
octave, [2**e * (1 + m/256), 2**e * (1 + (m+1)/256)) with e = MIN_EXP + (i-1) // 256 and
m = (i-1) % 256, and the last bin also takes everything from 2**MAX_EXP up. One bin spans at most
a ratio of 1 + 1/256, so a quantile read from the histogram, interpolated inside its bin, is
within 0.4% (relative) of the exact sample quantile.
"""

from __future__ import annotations

import math

import torch

MIN_EXP = -24
MAX_EXP = 16
BINS_PER_OCTAVE = 256
NUM_BINS = 1 + (MAX_EXP - MIN_EXP) * BINS_PER_OCTAVE
_MANTISSA_SHIFT = 23 - 8  # keep the top 8 of float32's 23 mantissa bits
_FIRST_KEY = (MIN_EXP + 127) * BINS_PER_OCTAVE  # bin key of 2**MIN_EXP (exponent bias 127)


def bin_lower_edge(index: int) -> float:
    """Return the smallest |x| that falls in bin `index` (0.0 for bin 0)."""
    if index <= 0:
        return 0.0
    octave, step = divmod(index - 1, BINS_PER_OCTAVE)
    return math.ldexp(1.0 + step / BINS_PER_OCTAVE, MIN_EXP + octave)


def magnitude_bins(x: torch.Tensor) -> torch.Tensor:
    """Map each entry of `x` to its histogram bin index (int32 tensor of the same shape)."""
    bits = x.detach().float().contiguous().view(torch.int32) & 0x7FFFFFFF
    return ((bits >> _MANTISSA_SHIFT) - (_FIRST_KEY - 1)).clamp_(0, NUM_BINS - 1)


def magnitude_histogram(x: torch.Tensor) -> torch.Tensor:
    """Return counts of |x| per bin, `[NUM_BINS]` float64."""
    return torch.bincount(magnitude_bins(x).flatten(), minlength=NUM_BINS).double()


def histogram_quantile(counts: torch.Tensor, q: float) -> float:
    """Return the q-quantile of |x| from its histogram, interpolating linearly inside the bin.

    Args:
        counts: `[NUM_BINS]` histogram from `magnitude_histogram`.
        q: fraction in [0, 1]; the result t satisfies P(|x| <= t) ~= q.

    Returns:
        The threshold; 0.0 when q falls inside the zero bin.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside [0, 1]")
    total = float(counts.sum())
    if total == 0:
        raise ValueError("the histogram is empty")
    if q == 0.0:
        return 0.0
    cumulative = torch.cumsum(counts, 0)
    rank = q * total
    index = min(int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype))), NUM_BINS - 1)
    if index == 0:
        return 0.0
    below = float(cumulative[index - 1])
    inside = float(counts[index])
    fraction = (rank - below) / inside if inside > 0 else 1.0
    low, high = bin_lower_edge(index), bin_lower_edge(index + 1)
    return low + fraction * (high - low)


def fraction_at_or_below(counts: torch.Tensor, threshold: float) -> float:
    """Return the fraction of observations with |x| <= threshold (inverse of `histogram_quantile`)."""
    total = float(counts.sum())
    if threshold <= 0:
        return float(counts[0]) / total if threshold == 0 else 0.0
    index = int(magnitude_bins(torch.tensor([threshold]))[0])
    low, high = bin_lower_edge(index), bin_lower_edge(index + 1)
    fraction = (threshold - low) / (high - low) if 0 < index < NUM_BINS - 1 else 1.0
    below = float(counts[:index].sum())
    return (below + fraction * float(counts[index])) / total


class SiteStatistics:
    """Accumulated statistics of one activation site with `channels` input channels."""

    def __init__(self, channels: int):
        self.histogram = torch.zeros(NUM_BINS, dtype=torch.float64)
        self.abs_sum = torch.zeros(channels, dtype=torch.float64)
        self.square_sum = torch.zeros(channels, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of activations `[..., channels]` into the statistics."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        abs_sum = flat.abs().sum(0, dtype=torch.float64)
        # A NaN or infinity anywhere makes its channel's sum non-finite: a cheap full check.
        if not torch.isfinite(abs_sum).all():
            raise FloatingPointError("non-finite activation")
        self.histogram += magnitude_histogram(flat)
        self.abs_sum += abs_sum
        self.square_sum += flat.square().sum(0, dtype=torch.float64)
        self.count += flat.shape[0]

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.histogram": self.histogram,
            f"{prefix}.abs_sum": self.abs_sum,
            f"{prefix}.square_sum": self.square_sum,
            f"{prefix}.count": torch.tensor([self.count], dtype=torch.float64),
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "SiteStatistics":
        stats = cls(tensors[f"{prefix}.abs_sum"].numel())
        stats.histogram = tensors[f"{prefix}.histogram"]
        stats.abs_sum = tensors[f"{prefix}.abs_sum"]
        stats.square_sum = tensors[f"{prefix}.square_sum"]
        stats.count = int(tensors[f"{prefix}.count"][0])
        return stats
