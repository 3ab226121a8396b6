"""Sparse runtime modules and the function that swaps them into a Hugging Face model.

`SparseLinear` replaces an `nn.Linear` whose input is thresholded (TEAL-style),
`SparseGatedMLP` replaces a gated MLP whose activated gate is thresholded (CATS-style), and
`SequenceMLP` replaces a gated MLP that keeps, for a whole sequence, the neurons its prompt
activated most (GRIFFIN- or TDA-style). They call a kernel backend from `moyu_kernels`; the "torch"
backend is the reference semantics.

Sparsity control is per module and set through `SparsityControl`:
- `enabled`: False runs the module dense (the dense baseline on the same weights).
- `dense_prefix`: positions `< dense_prefix` along the sequence axis stay dense (the evaluation
  protocol that keeps the first half of each window dense).
- `dense_prefill`: calls with more than one position stay dense (prefill policy "dense").
- `track`: count kept and total entries on the sparsified positions (realized sparsity).
"""

from __future__ import annotations

import bisect
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

import moyu_kernels

logger = logging.getLogger(__name__)


@dataclass
class ModulePlan:
    """The sparsity decided for one module: its kind, per-channel threshold and target sparsity."""

    # "linear" (threshold on the input), "gated_mlp" (threshold on act(gate)) or "sequence_mlp"
    # (the prompt chooses the neurons)
    kind: str
    # float32: [K] for K input channels, or K MLP neurons for gated_mlp. sequence_mlp: [0] for a
    # top-k selection (GRIFFIN); for a threshold on each neuron's prompt share (TDA), one value
    # per entry of `prompt_lengths`, or [1] for every prompt length.
    threshold: torch.Tensor
    target_sparsity: float
    # sequence_mlp with TDA thresholds only: the increasing prompt lengths, in tokens, that the
    # thresholds were measured at. Other lengths get a threshold interpolated in log length.
    prompt_lengths: torch.Tensor | None = None


class _SparseBase(nn.Module):
    def __init__(self, backend_name: str, backend):
        super().__init__()
        self.backend_name = backend_name
        self.backend = backend
        self.enabled = True
        self.dense_prefix = 0
        self.dense_prefill = False
        self.track = False
        self.kept = 0
        self.total = 0

    def reset_counts(self) -> None:
        self.kept = 0
        self.total = 0

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Split `x [B, T, K]` into the dense prefix and the sparsified rest, by the current control."""
        if not self.enabled or (self.dense_prefill and x.dim() >= 2 and x.shape[-2] > 1):
            return x, x[..., :0, :]
        if self.dense_prefix > 0 and x.dim() == 3:
            prefix = min(self.dense_prefix, x.shape[1])
            return x[:, :prefix], x[:, prefix:]
        return None, x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense_part, sparse_part = self._split(x)
        if dense_part is None:
            return self._sparse(x)
        if sparse_part.shape[-2] == 0:
            return self._dense(dense_part)
        return torch.cat([self._dense(dense_part), self._sparse(sparse_part)], dim=-2)

    def _count(self, mask: torch.Tensor) -> None:
        if self.track:
            self.kept += int(mask.sum())
            self.total += mask.numel()


class SparseLinear(_SparseBase):
    """A linear layer whose input entries at or under a per-channel threshold are skipped.

    Output equals `F.linear(where(|x| > threshold, x, 0), weight, bias)`. Kernel backends keep the
    weight transposed (`weight_t [K, N]`) so a skipped channel skips one contiguous row.
    """

    def __init__(self, linear: nn.Linear, threshold: torch.Tensor, backend_name: str, backend):
        super().__init__(backend_name, backend)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.register_buffer("threshold", threshold.float().contiguous(), persistent=False)
        self.bias = linear.bias
        if backend_name == "torch":
            self.weight = linear.weight
            self.weight_t = None
        else:
            # Converting at load time costs one transpose per layer (0.46 s for all 210 of
            # SmolLM2-135M's layers, 2 cores) and keeps the export loadable by plain transformers.
            self.weight = None
            self.register_buffer("weight_t", linear.weight.detach().t().contiguous(), persistent=False)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        y = torch.matmul(x, self.weight_t)
        return y + self.bias if self.bias is not None else y

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            if self.track:
                self._count(x.abs() > self.threshold.to(x.dtype))
            return self.backend.sparse_linear(x, self.weight_t, self.threshold, self.bias)
        # Compare in the activation dtype, as every kernel does (a bf16 model rounds its thresholds).
        mask = x.abs() > self.threshold.to(x.dtype)
        self._count(mask)
        return F.linear(torch.where(mask, x, torch.zeros((), dtype=x.dtype)), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend_name}"


class SparseGatedMLP(_SparseBase):
    """A gated MLP that skips neurons whose |act(gate_proj(x))| is at or under a per-neuron threshold.

    Output equals `down_proj(where(|a| > threshold, a, 0) * up_proj(x))` with `a = act_fn(gate_proj(x))`.
    gate_proj always runs dense; up_proj computes only the rows of kept neurons and down_proj reads
    only their columns.
    """

    def __init__(self, mlp: nn.Module, threshold: torch.Tensor, backend_name: str, backend):
        super().__init__(backend_name, backend)
        self.gate_proj = mlp.gate_proj
        self.up_proj = mlp.up_proj
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        self.register_buffer("threshold", threshold.float().contiguous(), persistent=False)
        if backend_name != "torch":
            self.register_buffer("down_t", self.down_proj.weight.detach().t().contiguous(), persistent=False)
            self.register_buffer("zero_threshold", torch.zeros(self.down_proj.in_features), persistent=False)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        active = self.act_fn(self.gate_proj(x))
        mask = active.abs() > self.threshold.to(active.dtype)
        self._count(mask)
        active = torch.where(mask, active, torch.zeros((), dtype=active.dtype))
        if self.backend_name == "torch":
            return self.down_proj(active * self.up_proj(x))
        up = self.backend.masked_rows_linear(x, self.up_proj.weight, mask)
        # Skipped neurons are exact zeros, so a zero threshold makes down_proj skip exactly them.
        return self.backend.sparse_linear(active * up, self.down_t, self.zero_threshold, self.down_proj.bias)


def prompt_scores(active: torch.Tensor) -> torch.Tensor:
    """Return each neuron's share of the prompt's activation energy, `[B, N]` from `active [B, T, N]`.

    Every position's activations are scaled to unit norm first, so each position weighs the same
    and a few large-norm positions cannot choose for all. Each row of the result sums to 1.
    """
    active = active.float()
    normalized = active / active.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return normalized.pow(2).mean(dim=-2)


class SequenceMLP(_SparseBase):
    """A gated MLP that runs each sequence on the neurons its prompt chose (GRIFFIN or TDA).

    A call with more than one position is a prompt, and it runs dense. From the prompt's
    activations `a = act(gate_proj(x)) * up_proj(x)`, each neuron gets its share of the prompt's
    activation energy (`prompt_scores`). Each sequence of the batch then keeps either the `keep`
    neurons with the largest share (GRIFFIN, `threshold` None) or the neurons whose share is above
    `threshold` (TDA, a per-layer threshold, so the count varies by sequence; at least one neuron).
    TDA's threshold depends on the prompt length: a short prompt averages its shares over fewer
    positions, so they are more uneven and fewer clear a threshold measured on long prompts. With
    `prompt_lengths`, `threshold` holds one value per length, and a prompt of T tokens uses the
    value interpolated linearly in log T (the first or last value outside the measured lengths).
    Calls of one position run on those neurons only: the rows of gate_proj and up_proj and the
    columns of down_proj of the kept neurons, gathered once per prompt into contiguous matrices,
    so every backend reads only the kept neurons' bytes.

    Under a dense prefix (the half-dense evaluation protocol) the prefix is the prompt and the rest
    of the same call runs on its selection. A one-position call before any prompt is a prompt.
    The prefill policy does not matter here: prompts always run dense.
    """

    def __init__(
        self,
        mlp: nn.Module,
        sparsity: float,
        backend_name: str,
        backend,
        threshold: float | list[float] | None = None,
        prompt_lengths: list[int] | None = None,
    ):
        super().__init__(backend_name, backend)
        self.gate_proj = mlp.gate_proj
        self.up_proj = mlp.up_proj
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        self.neurons = self.down_proj.in_features
        self.keep = max(1, round((1.0 - sparsity) * self.neurons))
        thresholds = [threshold] if isinstance(threshold, (int, float)) else threshold
        if thresholds is not None and len(thresholds) != (1 if prompt_lengths is None else len(prompt_lengths)):
            raise ValueError(f"invalid TDA thresholds: {len(thresholds)} values for the prompt lengths {prompt_lengths}; pass one per length")
        self.thresholds = thresholds
        self.prompt_lengths = prompt_lengths
        self.selected: list[torch.Tensor] | None = None  # per sequence of the batch: its kept neuron indices, sorted
        self._gathered: list[tuple] = []

    def _activations(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._activations(x))

    @property
    def threshold(self) -> float | None:
        """TDA's threshold at the longest measured prompt length; None for a top-k selection."""
        return None if self.thresholds is None else self.thresholds[-1]

    def threshold_for(self, prompt: int) -> float:
        """Return TDA's threshold for a prompt of `prompt` tokens."""
        lengths, values = self.prompt_lengths, self.thresholds
        if lengths is None:
            return values[0]
        if prompt <= lengths[0]:
            return values[0]
        if prompt >= lengths[-1]:
            return values[-1]
        upper = bisect.bisect_right(lengths, prompt)
        low, high = lengths[upper - 1], lengths[upper]
        weight = math.log(prompt / low) / math.log(high / low)
        return values[upper - 1] + weight * (values[upper] - values[upper - 1])

    def _select(self, active: torch.Tensor) -> None:
        """Choose each sequence's neurons from the prompt activations `active [B, T, N]`."""
        score = prompt_scores(active)
        if self.thresholds is None:
            self.selected = list(torch.topk(score, self.keep, dim=-1).indices.sort(dim=-1).values)
        else:
            threshold = self.threshold_for(active.shape[-2])
            self.selected = []
            for row in score:
                chosen = torch.nonzero(row > threshold).flatten()
                self.selected.append(chosen if chosen.numel() else row.argmax().reshape(1))
        self._gathered = [self._gather(indices) for indices in self.selected]

    def _gather(self, indices: torch.Tensor) -> tuple:
        """Copy the weights of the neurons `indices` into contiguous matrices for one sequence."""
        gate = self.gate_proj.weight[indices]  # [keep, H]
        up = self.up_proj.weight[indices]
        down_t = self.down_proj.weight.t()[indices]  # [keep, H]
        gate_bias = None if self.gate_proj.bias is None else self.gate_proj.bias[indices]
        up_bias = None if self.up_proj.bias is None else self.up_proj.bias[indices]
        if self.backend_name == "torch":
            return gate, up, down_t, gate_bias, up_bias
        # Kernel layout: one [H, 2 * keep] matrix for gate and up (transposed), read whole by a
        # threshold of -1 on every channel.
        gate_up_t = torch.cat([gate, up], dim=0).t().contiguous()
        bias = None if gate_bias is None else torch.cat([gate_bias, up_bias])
        read_all = (torch.full((gate_up_t.shape[0],), -1.0), torch.full((indices.numel(),), -1.0))
        return gate_up_t, down_t.contiguous(), bias, read_all

    def _selected_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run `x [B, T, H]` on each sequence's selected neurons."""
        outputs = []
        for row, gathered in enumerate(self._gathered):
            row_input = x[row]
            if self.backend_name == "torch":
                gate, up, down_t, gate_bias, up_bias = gathered
                g, u = F.linear(row_input, gate, gate_bias), F.linear(row_input, up, up_bias)
                outputs.append(torch.matmul(self.act_fn(g) * u, down_t))
            else:
                gate_up_t, down_t, bias, read_all = gathered
                g, u = self.backend.sparse_linear(row_input, gate_up_t, read_all[0], bias).chunk(2, dim=-1)
                outputs.append(self.backend.sparse_linear(self.act_fn(g) * u, down_t, read_all[1], None))
        y = torch.stack(outputs)
        if self.down_proj.bias is not None:
            y = y + self.down_proj.bias
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self._dense(x)
        if x.dim() != 3:
            raise ValueError(f"invalid SequenceMLP input shape {tuple(x.shape)}; pass [batch, positions, hidden]")
        positions = x.shape[1]
        if self.dense_prefix > 0:
            prompt = min(self.dense_prefix, positions)
        elif positions > 1 or self.selected is None or len(self.selected) != x.shape[0]:
            prompt = positions  # a new prompt (dense prefill or not, the prompt runs dense)
        else:
            prompt = 0
        outputs = []
        if prompt:
            active = self._activations(x[:, :prompt])
            self._select(active)
            outputs.append(self.down_proj(active))
        if prompt < positions:
            rest = x[:, prompt:]
            if self.track:
                self.kept += sum(indices.numel() for indices in self.selected) * rest.shape[1]
                self.total += self.neurons * rest.shape[0] * rest.shape[1]
            outputs.append(self._selected_forward(rest))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)

    def extra_repr(self) -> str:
        if self.thresholds is None:
            rule = f"keep={self.keep}/{self.neurons}"
        elif self.prompt_lengths is None:
            rule = f"share>{self.threshold:.3g} of {self.neurons}"
        else:
            rule = (f"share>{self.thresholds[0]:.3g}-{self.thresholds[-1]:.3g} (prompts of "
                    f"{self.prompt_lengths[0]}-{self.prompt_lengths[-1]} tokens) of {self.neurons}")
        return f"{rule} neurons per sequence, backend={self.backend_name}"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_plan(model: nn.Module, plan: dict[str, ModulePlan], backend: str = "auto") -> str:
    """Swap sparse modules into `model` in place, following `plan`; returns the resolved backend name."""
    device = str(next(model.parameters()).device)
    backend_name, kernels = moyu_kernels.get_backend(backend, device=device)
    for name, entry in plan.items():
        original = model.get_submodule(name)
        if entry.kind == "linear":
            replacement = SparseLinear(original, entry.threshold, backend_name, kernels)
        elif entry.kind == "gated_mlp":
            replacement = SparseGatedMLP(original, entry.threshold, backend_name, kernels)
        elif entry.kind == "sequence_mlp":
            # TDA has per-layer thresholds on the prompt share, one per prompt length. GRIFFIN's top-k has none.
            thresholds = entry.threshold.tolist() if entry.threshold.numel() else None
            lengths = None if entry.prompt_lengths is None else [int(n) for n in entry.prompt_lengths.tolist()]
            replacement = SequenceMLP(original, entry.target_sparsity, backend_name, kernels, thresholds, lengths)
        else:
            raise ValueError(f"unknown module plan kind {entry.kind!r} for {name}")
        _set_module(model, name, replacement)
    logger.info("sparsified %d modules with the %s backend", len(plan), backend_name)
    return backend_name


def sparse_modules(model: nn.Module) -> dict[str, _SparseBase]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _SparseBase)}


@contextmanager
def sparsity_control(
    model: nn.Module,
    enabled: bool | None = None,
    dense_prefix: int | None = None,
    dense_prefill: bool | None = None,
    track: bool | None = None,
) -> Iterator[dict[str, _SparseBase]]:
    """Set the given sparsity controls of every sparse module for the duration of the block.

    Controls left as None keep their current value, so blocks nest: an outer `enabled=False`
    survives an inner block that only turns on tracking. Turning tracking on resets the counts.
    """
    changes = {"enabled": enabled, "dense_prefix": dense_prefix, "dense_prefill": dense_prefill, "track": track}
    changes = {key: value for key, value in changes.items() if value is not None}
    modules = sparse_modules(model)
    saved = {name: {key: getattr(module, key) for key in changes} for name, module in modules.items()}
    for module in modules.values():
        for key, value in changes.items():
            setattr(module, key, value)
        if track:
            module.reset_counts()
    try:
        yield modules
    finally:
        for name, module in modules.items():
            for key, value in saved[name].items():
                setattr(module, key, value)
