"""Neuron rewiring: make each MLP's always-active neurons contiguous and run them dense.

Activation sparsity has inertia: in a gated MLP a small set of neurons is active for nearly every
token. Rewiring measures, on calibration text with the plan applied, how often each neuron (an
input channel of down_proj) is kept, then permutes the neurons by decreasing frequency: rows of
gate_proj and up_proj, columns of down_proj. A permutation of the neurons leaves the MLP's
function unchanged (up to float rounding from the reordered sum). The neurons kept at least
`core_frequency` of the time, now the first `core` channels, get threshold -1 so they always
run, which makes them one contiguous dense block of down_proj rows in the kernels' transposed
layout.

NOTE: the CPU and Triton kernels still test every channel against its threshold, so a contiguous
core gives no speed-up by itself yet. The core's bytes are counted as read (realized sparsity drops
by the core's few skipped entries), and the quality changes only through those entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .architecture import DecoderLayout, forward_with_hooks
from .modeling import ModulePlan


@dataclass
class RewireReport:
    """Per MLP: the size of the dense core and the neuron order applied."""

    core: dict[str, int]  # MLP name -> number of neurons in the dense core
    neurons: dict[str, int]  # MLP name -> number of neurons

    def to_dict(self) -> dict:
        return {"core": self.core, "neurons": self.neurons}


def permute_mlp(mlp: nn.Module, order: torch.Tensor) -> None:
    """Reorder the neurons of a gated MLP in place: neuron `order[i]` becomes neuron i."""
    with torch.no_grad():
        for linear in (mlp.gate_proj, mlp.up_proj):
            linear.weight.copy_(linear.weight[order])
            if linear.bias is not None:
                linear.bias.copy_(linear.bias[order])
        mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, order])


def neuron_frequency(model: nn.Module, layout: DecoderLayout, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return, per gated MLP, the fraction of tokens for which each neuron is kept.

    `model` must already run the plan (sparse modules swapped in). A neuron counts as kept when its
    down_proj input passes down_proj's threshold; an MLP whose down_proj is not sparse counts every
    nonzero entry as kept.
    """
    counts: dict[str, torch.Tensor] = {}
    handles = []
    for name in layout.mlps:
        down = model.get_submodule(f"{name}.down_proj")
        threshold = getattr(down, "threshold", None)

        def hook(module, args, name=name, threshold=threshold):
            x = args[0].detach()
            kept = (x.abs() > threshold) if threshold is not None else (x != 0)
            total = kept.reshape(-1, kept.shape[-1]).sum(0, dtype=torch.float64)
            counts[name] = counts.get(name, 0) + total

        handles.append(down.register_forward_pre_hook(hook))
    forward_with_hooks(model, input_ids, handles)
    tokens = input_ids.numel()
    return {name: count / tokens for name, count in counts.items()}


def rewire(
    model: nn.Module,
    layout: DecoderLayout,
    plan: dict[str, ModulePlan],
    frequency: dict[str, torch.Tensor],
    core_frequency: float,
) -> tuple[dict[str, ModulePlan], RewireReport]:
    """Permute every gated MLP's neurons by decreasing `frequency` and run the core dense.

    `model` must hold the original `nn.Linear` modules (before `apply_plan`). Returns the plan with
    the per-neuron thresholds (down_proj's, or the gated MLP's) permuted the same way and set to
    -1 on the core, and the core size per MLP.
    """
    plan = dict(plan)
    report = RewireReport({}, {})
    for name, mlp in layout.mlps.items():
        order = torch.argsort(frequency[name], descending=True, stable=True)
        core = int((frequency[name] >= core_frequency).sum())
        permute_mlp(mlp, order)
        for key in (f"{name}.down_proj", name):
            if key in plan:
                threshold = plan[key].threshold[order].clone()
                threshold[:core] = -1.0
                plan[key] = ModulePlan(plan[key].kind, threshold, plan[key].target_sparsity)
        report.core[name] = core
        report.neurons[name] = int(order.numel())
    return plan, report
