"""Find the decoder layers of a causal LM and the linear modules inside them.

Discovery works from the module tree, not from a table of model names: the decoder layers are the
`nn.ModuleList` whose length equals `config.num_hidden_layers`, and every `nn.Linear` inside a layer
is a candidate for sparsification. A gated MLP (Llama, Mistral, Qwen2, Gemma) is a module with
`gate_proj`, `up_proj` and `down_proj` linears and an `act_fn`, computing
`down_proj(act_fn(gate_proj(x)) * up_proj(x))`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedArchitectureError


@dataclass
class DecoderLayout:
    """Locations of the sparsifiable modules of a model."""

    layers_path: str  # e.g. "model.layers"
    linears: dict[str, nn.Linear]  # full module name -> module, in forward order
    mlps: dict[str, nn.Module]  # full name of each gated MLP -> module
    layer_of: dict[str, int]  # full module name -> decoder layer index


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return f"{type(model).__name__} (model_type={model_type!r})"


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_logits(model: nn.Module, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Apply `model`'s LM head and its final logit soft-capping, if any, to final hidden states, for vocabulary `rows` (None: all)."""
    head = model.get_output_embeddings()
    weight = head.weight if rows is None else head.weight[rows]
    bias = head.bias if head.bias is None or rows is None else head.bias[rows]
    logits = F.linear(hidden, weight, bias)
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the name and the `nn.ModuleList` of the decoder layers.

    Raises:
        UnsupportedArchitectureError: no module list matches the configured layer count.
    """
    count = getattr(text_config(model), "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    if count is None or len(candidates) != 1:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {_describe(model)}: expected exactly one list of "
            f"{count} decoder layers, found {len(candidates)}; moyu supports decoder-only causal LMs "
            "such as Llama, Mistral, Qwen2 and Gemma"
        )
    return candidates[0]


def is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in ("gate_proj", "up_proj", "down_proj")) and callable(
        getattr(module, "act_fn", None)
    )


def discover(model: nn.Module) -> DecoderLayout:
    """Discover the decoder layers, their linear modules and their gated MLPs."""
    layers_path, layers = find_decoder_layers(model)
    linears: dict[str, nn.Linear] = {}
    mlps: dict[str, nn.Module] = {}
    layer_of: dict[str, int] = {}
    for index, layer in enumerate(layers):
        prefix = f"{layers_path}.{index}"
        for name, module in layer.named_modules():
            full = f"{prefix}.{name}" if name else prefix
            if isinstance(module, nn.Linear):
                linears[full] = module
                layer_of[full] = index
            elif is_gated_mlp(module):
                mlps[full] = module
                layer_of[full] = index
    if not linears:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {_describe(model)}: its decoder layers hold no nn.Linear modules"
        )
    return DecoderLayout(layers_path, linears, mlps, layer_of)


def match_targets(names: list[str], targets: list[str], ignore: list[str]) -> list[str]:
    """Select module names by targets and ignore lists.

    A plain entry matches the last component of the name (`q_proj`) or the whole name; an entry
    with the `re:` prefix is a regular expression searched in the full name. `all` matches every name.
    """

    def hit(name: str, pattern: str) -> bool:
        if pattern == "all":
            return True
        if pattern.startswith("re:"):
            return re.search(pattern[3:], name) is not None
        return name == pattern or name.rsplit(".", 1)[-1] == pattern

    return [n for n in names if any(hit(n, t) for t in targets) and not any(hit(n, i) for i in ignore)]


def forward_with_hooks(model: nn.Module, input_ids: torch.Tensor, handles: list) -> None:
    """Run one inference-mode forward of `model` on `input_ids`, then remove the hook `handles`, even on error."""
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
