"""Sequential threshold calibration: thresholds measured on the inputs each module receives in the sparse model.

A threshold read from the calibration histograms is a quantile of the *dense* model's activations.
Once the modules before it skip channels, a module's input changes, and its realized sparsity
drifts from its target, mostly upward at high sparsity (SmolLM2-135M, `teal-block-greedy` at a
70% target: 72.4% realized on the test text, `teal-uniform`: 76.4%). With a recipe's
`sequential:` block set, every `magnitude` threshold is instead measured on calibration windows
run through the model as it will run. Module by module in forward order, each threshold becomes
the exact quantile, at the module's target sparsity, of its score on the input it receives with
every earlier module already sparse at its new threshold.

Modules that share an input (q/k/v, gate/up) are calibrated together, so one layer takes one
forward per distinct input (four in a Llama block) plus one to produce the next layer's input.
The decoder layers are replayed one at a time from the embedding output (allocate.LayerReplay),
so the cost is about five full forwards of the backbone on `sequential.tokens` tokens, and the LM
head never runs. Only `magnitude` modifiers are recalibrated. Other modules keep their plan.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn

from .allocate import LayerReplay
from .architecture import DecoderLayout, find_decoder_layers
from .calibrate import column_norms
from .errors import MoyuError
from .modeling import ModulePlan, apply_plan, sparse_modules

logger = logging.getLogger(__name__)


def exact_threshold(x: torch.Tensor, sparsity: float, norms: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Return the per-channel threshold that skips `sparsity` of the entries of `x [..., K]`, and the fraction it skips.

    The score of entry (t, k) is |x[t, k]|, or |x[t, k]| * norms[k] when `norms` (the weight column
    norms, WINA) is given. The threshold of channel k is then t / norms[k], infinite for an all-zero
    column. An entry is skipped when its score is at or under the score threshold, so ties make the
    skipped fraction a little larger.
    """
    score = x.detach().float().abs().reshape(-1, x.shape[-1])
    if norms is not None:
        score = score * norms
    flat = score.flatten()
    count = int(round(sparsity * flat.numel()))
    if count == 0:
        # Nothing to skip: a negative threshold keeps every entry, exact zeros included.
        return torch.full((x.shape[-1],), -1.0), 0.0
    value = float(flat.kthvalue(count).values)
    skipped = float((flat <= value).float().mean())
    threshold = torch.full((x.shape[-1],), value) if norms is None else value / norms
    return threshold.float(), skipped


def sequential_thresholds(
    model: nn.Module,
    layout: DecoderLayout,
    plan: dict[str, ModulePlan],
    scores: dict[str, str],
    input_ids: torch.Tensor,
) -> tuple[dict[str, ModulePlan], dict[str, float]]:
    """Recompute the thresholds of the modules in `scores` (name -> "magnitude" | "weighted") in forward order.

    `model` is left unchanged: the work runs on a copy with the plan's sparse modules (torch backend).

    Returns:
        The new plan (other entries unchanged) and, per recalibrated module, the fraction of its
        calibration entries the new threshold skips.

    Raises:
        MoyuError: a module's input contains NaN or infinite values.
    """
    started = time.perf_counter()
    work = copy.deepcopy(model)
    apply_plan(work, plan, backend="torch")
    modules = sparse_modules(work)
    targets = {name for name in scores if name in plan and plan[name].kind == "linear"}
    layers_path, layers = find_decoder_layers(work)
    # Only the backbone runs: the LM head would cost more than the layers on a large vocabulary.
    backbone = work.get_submodule(layers_path.rsplit(".", 1)[0])
    for module in modules.values():
        module.enabled = False
    replay = LayerReplay(backbone, layers, input_ids, all_inputs=False)
    hidden = replay.inputs[0]
    new_plan = dict(plan)
    skipped: dict[str, float] = {}
    for index in range(len(layers)):
        prefix = f"{layers_path}.{index}."
        in_layer = [name for name in plan if name.startswith(prefix)]
        pending = [name for name in layout.linears if name in targets and name.startswith(prefix)]
        for name in in_layer:
            # Modules that are not recalibrated run sparse at once, and the pending ones dense until their turn.
            modules[name].enabled = name not in targets
        while pending:
            stage, stage_input = _first_stage(replay, index, hidden, {name: modules[name] for name in pending})
            if not bool(torch.isfinite(stage_input).all()):
                raise MoyuError(
                    f"NaN or infinite activation at the input of {stage[0]} during sequential threshold calibration; "
                    "check the checkpoint, or lower the recipe's recovery.lr if recovery ran first"
                )
            for name in stage:
                norms = column_norms(layout.linears[name].weight) if scores[name] == "weighted" else None
                threshold, skipped[name] = exact_threshold(stage_input, plan[name].target_sparsity, norms)
                modules[name].threshold = threshold
                modules[name].enabled = True
                new_plan[name] = ModulePlan("linear", threshold, plan[name].target_sparsity)
            pending = [name for name in pending if name not in stage]
        hidden = replay.run(index, hidden)
    logger.info("sequential thresholds: %d modules on %d tokens in %.1f s", len(skipped), input_ids.numel(), time.perf_counter() - started)
    return new_plan, skipped


def _first_stage(replay: LayerReplay, index: int, hidden: torch.Tensor, pending: dict[str, nn.Module]) -> tuple[list[str], torch.Tensor]:
    """Run layer `index` once and return the pending modules called first, all on one input tensor, and that input."""
    stage: list[str] = []
    captured: list[torch.Tensor] = []

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            if not captured:
                captured.append(x)
                stage.append(name)
            elif x is captured[0] and name not in stage:
                stage.append(name)

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in pending.items()]
    try:
        replay.run(index, hidden)
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise RuntimeError(f"decoder layer {index} never called modules {sorted(pending)}")
    return stage, captured[0]
