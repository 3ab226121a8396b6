"""PyTorch reference for every moyu kernel: the semantics each faster backend must match.

Weight layout: sparse layers keep their weight transposed, `weight_t[K, N]` (input channel major),
so that skipping input channel k skips one contiguous row of N values.

Thresholds are per input channel (`threshold[K]`, float32). An input entry is kept when
`abs(x) > threshold`; a uniform threshold is the same value repeated, a weight-aware score
(|x_k| * ||W[:, k]||) becomes `threshold / colnorm`, and a dense core of channels uses -1.
"""

from __future__ import annotations

import torch


def sparse_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multiply the above-threshold entries of `x` by `weight_t`.

    Args:
        x: activations `[..., K]`.
        weight_t: transposed weight `[K, N]`.
        threshold: per-channel threshold `[K]`; an entry is kept when `abs(x) > threshold`.
        bias: optional `[N]`.

    Returns:
        `[..., N]` in the dtype of `x`; the product accumulates in float32.
    """
    kept = torch.where(x.abs() > threshold.to(x.dtype), x, torch.zeros((), dtype=x.dtype))
    y = torch.matmul(kept.float(), weight_t.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def masked_rows_linear(x: torch.Tensor, weight: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """Compute only the output rows selected by `row_mask`; the others are zero.

    Used for the up projection of a gated MLP when the gate decides which neurons are active,
    so the kernel reads only the weight rows of active neurons.

    Args:
        x: activations `[..., K]`.
        weight: weight in the usual `[N, K]` layout (output row major).
        row_mask: bool `[..., N]`, True where the output is computed.

    Returns:
        `[..., N]` in the dtype of `x`, zero where `row_mask` is False.
    """
    y = torch.matmul(x.float(), weight.float().t())
    return torch.where(row_mask, y, torch.zeros((), dtype=y.dtype)).to(x.dtype)
