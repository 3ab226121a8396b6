"""Per-layer thresholds for threshold-based sequence selection (TDA, "First Activations Matter").

GRIFFIN keeps the same number of MLP neurons for every sequence. TDA keeps, in each layer, the
neurons whose share of the prompt's activation energy (`modeling.prompt_scores`) is above a
per-layer threshold. A prompt that spreads its energy over many neurons keeps more of them.

The thresholds of each MLP are quantiles, at the MLP's target sparsity, of the shares measured on
calibration prompts: prefixes of calibration windows, run through the dense model as a prompt runs
while generating. A short prompt averages its shares over fewer positions, which makes them more
uneven, so fewer neurons clear a threshold measured on long prompts (on SmolLM2 at a 66.7%
target, 6-token prompts kept 22.4% of the neurons with the 256-token threshold and 33.7% with
their own; benchmarks/tda_prompt_lengths.py). So each MLP gets one threshold per prompt length:
1, 2, 4, ... tokens and the longest calibration prompt, all read from the same forward pass (the
model is causal, so a prefix's activations are those of the first positions of the whole prompt). `SequenceMLP` interpolates between them in log length. On the
calibration prompts the kept fraction averages the target at every measured length; on other
text it does not. Evaluation reports the fraction realized.
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


def prompt_lengths(longest: int) -> list[int]:
    """Return the prompt lengths thresholds are measured at: the powers of two under `longest`, then `longest`."""
    lengths = [1 << k for k in range(longest.bit_length()) if 1 << k < longest]
    return lengths + [longest]


def prompt_thresholds(
    model: nn.Module,
    plan: dict[str, ModulePlan],
    names: list[str],
    prompts: torch.Tensor,
    chunk: int = 4,
) -> tuple[dict[str, ModulePlan], dict[str, float]]:
    """Set the thresholds of every `sequence_mlp` entry of `plan` named in `names` from calibration prompts.

    Args:
        model: the dense model (no sparse modules in the named MLPs); left unchanged.
        prompts: `[windows, prompt]` token ids, each row one calibration prompt; its prefixes of
            `prompt_lengths(prompt)` tokens are the shorter prompts.

    Returns:
        The new plan (other entries unchanged) and, per MLP, the fraction of its calibration
        prompt shares at or under the new threshold, at the longest prompt length.

    Raises:
        MoyuError: an MLP's prompt shares contain NaN or infinite values.
    """
    started = time.perf_counter()
    lengths = prompt_lengths(prompts.shape[1])
    # Per MLP, one [windows, neurons] block of shares per prompt length, gathered chunk by chunk.
    shares: dict[str, list[list[torch.Tensor]]] = {name: [[] for _ in lengths] for name in names}

    def hook_for(name: str):
        mlp = model.get_submodule(name)

        def hook(module, args):
            active = mlp.act_fn(mlp.gate_proj(args[0])) * mlp.up_proj(args[0])
            for index, length in enumerate(lengths):
                shares[name][index].append(prompt_scores(active[:, :length]))

        return hook

    for ids in prompts.split(chunk):
        handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in names]
        forward_with_hooks(model, ids, handles)
    new_plan = dict(plan)
    skipped: dict[str, float] = {}
    for name in names:
        target = plan[name].target_sparsity
        values = []
        for index, length in enumerate(lengths):
            flat = torch.cat(shares[name][index]).flatten()
            if not bool(torch.isfinite(flat).all()):
                raise MoyuError(f"NaN or infinite activation in {name} on the calibration prompts; check the checkpoint")
            count = int(round(target * flat.numel()))
            # A negative threshold keeps every neuron, shares of exactly zero included.
            values.append(float(flat.kthvalue(count).values) if count else -1.0)
        skipped[name] = float((flat <= values[-1]).float().mean())
        new_plan[name] = ModulePlan(
            "sequence_mlp", torch.tensor(values, dtype=torch.float32), target, torch.tensor(lengths, dtype=torch.int64)
        )
    logger.info(
        "prompt thresholds: %d MLPs on %d prompts at %d lengths of 1-%d tokens in %.1f s",
        len(names), prompts.shape[0], len(lengths), prompts.shape[1], time.perf_counter() - started,
    )
    return new_plan, skipped
