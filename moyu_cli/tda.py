"""Per-layer thresholds for threshold-based sequence selection (TDA, "First Activations Matter").

GRIFFIN keeps the same number of MLP neurons for every sequence. TDA keeps, in each layer, the
neurons whose share of the prompt's activation energy (`modeling.prompt_scores`) is above a
per-layer threshold. A prompt that spreads its energy over many neurons keeps more of them.

The threshold of each MLP is the quantile, at the MLP's target sparsity, of the shares measured
on calibration prompts: the first `prompt` tokens of calibration windows, run through the dense
model as a prompt runs while generating. On those prompts the kept fraction averages to the
target. On other text, and on prompts of another length, it does not: longer prompts average
over more positions and give flatter shares. Evaluation reports the fraction realized.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .architecture import forward_with_hooks
from .errors import MoyuError
from .modeling import ModulePlan, prompt_scores

logger = logging.getLogger(__name__)


def prompt_thresholds(
    model: nn.Module,
    plan: dict[str, ModulePlan],
    names: list[str],
    prompts: torch.Tensor,
    chunk: int = 4,
) -> tuple[dict[str, ModulePlan], dict[str, float]]:
    """Set the threshold of every `sequence_mlp` entry of `plan` named in `names` from calibration prompts.

    Args:
        model: the dense model (no sparse modules in the named MLPs); left unchanged.
        prompts: `[windows, prompt]` token ids, each row one calibration prompt.

    Returns:
        The new plan (other entries unchanged) and, per MLP, the fraction of its calibration
        prompt shares at or under the new threshold.

    Raises:
        MoyuError: an MLP's prompt shares contain NaN or infinite values.
    """
    started = time.perf_counter()
    shares: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook_for(name: str):
        mlp = model.get_submodule(name)

        def hook(module, args):
            x = args[0]
            shares[name].append(prompt_scores(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)))

        return hook

    for ids in prompts.split(chunk):
        handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in names]
        forward_with_hooks(model, ids, handles)
    new_plan = dict(plan)
    skipped: dict[str, float] = {}
    for name in names:
        flat = torch.cat(shares[name]).flatten()
        if not bool(torch.isfinite(flat).all()):
            raise MoyuError(f"NaN or infinite activation in {name} on the calibration prompts; check the checkpoint")
        target = plan[name].target_sparsity
        count = int(round(target * flat.numel()))
        # A negative threshold keeps every neuron, shares of exactly zero included.
        value = float(flat.kthvalue(count).values) if count else -1.0
        skipped[name] = float((flat <= value).float().mean())
        new_plan[name] = ModulePlan("sequence_mlp", torch.tensor([value], dtype=torch.float32), target)
    logger.info(
        "prompt thresholds: %d MLPs on %d prompts of %d tokens in %.1f s",
        len(names), prompts.shape[0], prompts.shape[1], time.perf_counter() - started,
    )
    return new_plan, skipped
