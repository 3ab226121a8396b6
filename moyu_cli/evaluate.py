"""Perplexity and realized sparsity on real text.

Protocol (WikiText-style, as in the activation-sparsity literature): the text is prepared as in
`data.py`, tokenized once, and cut into non-overlapping windows of `window` tokens (the first
`max_windows`). Each window is one forward pass; the loss is the mean next-token cross-entropy
over the `window - 1` targets inside the window. When the tokenizer uses BOS (Gemma), BOS is put in
front of every window and the prediction of the window's first token from BOS is not scored, so
the targets are the same with and without BOS.

Sparsified positions: "strict" sparsifies every position; "half-dense" keeps the first half of
each window dense and scores every target as before (as TEAL evaluates).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import find_decoder_layers
from .data import TextSource, tokenize, uses_bos, windows
from .modeling import SequenceMLP, SparseGatedMLP, SparseLinear, sparse_modules, sparsity_control

PROTOCOLS = ("strict", "half-dense")


@dataclass
class EvalResult:
    """Perplexity and realized sparsity of one evaluation run."""

    perplexity: float
    protocol: str
    windows: int
    window: int
    targets: int
    bos: bool
    data: list[str]
    seconds: float
    module_sparsity: dict[str, float] = field(default_factory=dict)
    model_sparsity: float = 0.0  # fraction of all decoder linear weight bytes skipped

    def to_dict(self) -> dict:
        return asdict(self)


def decoder_linear_params(model: nn.Module) -> int:
    """Count the weights of every linear layer inside the decoder layers, sparse or not."""
    _, layers = find_decoder_layers(model)
    total = 0
    for module in layers.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel()
        elif isinstance(module, SparseLinear):
            total += module.in_features * module.out_features
    return total


def skipped_params(name: str, module: nn.Module, sparsity: float) -> float:
    """Return the weights a module skips at a realized activation sparsity."""
    if isinstance(module, SparseGatedMLP):
        # Each skipped neuron saves its row of up_proj and its column of down_proj.
        return sparsity * (module.up_proj.weight.numel() + module.down_proj.weight.numel())
    if isinstance(module, SequenceMLP):
        # A neuron left out of the selection saves its rows of gate_proj and up_proj and its column of down_proj.
        return sparsity * (module.gate_proj.weight.numel() + module.up_proj.weight.numel() + module.down_proj.weight.numel())
    return sparsity * module.in_features * module.out_features


def perplexity(
    model: nn.Module,
    tokenizer,
    sources: list[TextSource],
    window: int = 512,
    max_windows: int | None = 64,
    protocol: str = "strict",
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Measure perplexity and per-module realized sparsity of `model` on `sources`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    bos = tokenizer.bos_token_id if uses_bos(tokenizer) else None
    batch = windows(tokenize(tokenizer, sources), window, max_windows=max_windows, bos_id=bos)
    offset = 1 if bos is not None else 0
    dense_prefix = offset + window // 2 if protocol == "half-dense" else 0
    total_loss = 0.0
    targets = 0
    started = time.perf_counter()
    with torch.inference_mode(), sparsity_control(model, dense_prefix=dense_prefix, track=True) as modules:
        for index in range(batch.shape[0]):
            ids = batch[index : index + 1]
            logits = model(input_ids=ids, use_cache=False).logits[0, offset:-1].float()
            labels = ids[0, offset + 1 :]
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            targets += labels.numel()
            if progress is not None:
                progress(index + 1, batch.shape[0])
        module_sparsity = {n: 1.0 - m.kept / m.total for n, m in modules.items() if m.total}
    skipped = sum(skipped_params(n, modules[n], s) for n, s in module_sparsity.items())
    return EvalResult(
        perplexity=math.exp(total_loss / targets),
        protocol=protocol,
        windows=batch.shape[0],
        window=window,
        targets=targets,
        bos=bos is not None,
        data=[s.name for s in sources],
        seconds=round(time.perf_counter() - started, 1),
        module_sparsity=module_sparsity,
        model_sparsity=skipped / decoder_linear_params(model) if sparse_modules(model) else 0.0,
    )
