"""Decoding speed of a dense and a sparse model in one process, with the memory-bandwidth bound.

Both models decode greedily with the same lean loop (`decode.LeanDecoder`), alternating dense and
sparse runs after a warm-up so that both see the same machine state. The bound compares the weight
bytes each model reads per token with the bandwidth this machine reaches on a large streaming
read (`torch.sum` over 512 MiB).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .architecture import find_decoder_layers
from .decode import LeanDecoder
from .evaluate import decoder_linear_params, skipped_params
from moyu_kernels.reference import sparse_linear as reference_sparse_linear

from .modeling import SparseLinear, sparse_modules, sparsity_control


@dataclass
class BenchResult:
    """Tokens per second of both models, their ratio and the bandwidth bound."""

    new_tokens: int
    repeats: int
    backend: str
    threads: int
    dense_tokens_per_s: float
    sparse_tokens_per_s: float
    ratio: float
    reference_match: str  # how the sparse kernel's tokens compare with the torch reference's
    bandwidth_gb_s: float
    dense_bytes_per_token: float
    sparse_bytes_per_token: float
    bound_ratio: float  # dense bytes / sparse bytes: the speed-up if only weight reads cost time
    model_sparsity: float
    module_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # module kind -> {dense, sparse} ms per token

    def to_dict(self) -> dict:
        return asdict(self)


def measure_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Return the best GB/s of `torch.sum` over a float32 buffer that no cache holds."""
    buffer = torch.ones(megabytes * (1 << 20) // 4)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.sum(buffer)
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best / 1e9


def _weight_bytes(model: nn.Module) -> float:
    element = next(model.parameters()).element_size()
    head = model.lm_head.weight.numel()
    return (decoder_linear_params(model) + head) * element


def _module_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _time_modules(model: nn.Module, decoder: LeanDecoder, ids: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Return milliseconds per generated token spent in each projection kind (hooks around forward)."""
    spent: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}
    handles = []
    _, layers = find_decoder_layers(model)
    for name, module in layers.named_modules():
        kind = _module_kind(name)
        if kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "mlp"):
            handles.append(module.register_forward_pre_hook(lambda m, a: starts.__setitem__(id(m), time.perf_counter())))
            handles.append(module.register_forward_hook(
                lambda m, a, o, kind=kind: spent.__setitem__(kind, spent[kind] + time.perf_counter() - starts[id(m)])))
    try:
        decoder.generate(ids, new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    return {kind: 1000 * seconds / new_tokens for kind, seconds in spent.items()}


def _timed_generate(decoder: LeanDecoder, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    decoder.reset()
    logits = decoder.forward(ids)  # prefill is not part of the decoding speed
    produced = []
    started = time.perf_counter()
    for _ in range(new_tokens):
        token = int(torch.argmax(logits))
        produced.append(token)
        logits = decoder.forward(torch.tensor([[token]]))
    return new_tokens / (time.perf_counter() - started), produced


def _greedy_tokens(model: nn.Module, ids: torch.Tensor, new_tokens: int, fuse: bool = False) -> tuple[list[int], list[torch.Tensor]]:
    decoder = LeanDecoder(model, ids.shape[1] + new_tokens + 1, fuse=fuse)
    logits = decoder.forward(ids)
    tokens, steps = [], []
    for _ in range(new_tokens):
        steps.append(logits)
        tokens.append(int(torch.argmax(logits)))
        logits = decoder.forward(torch.tensor([[tokens[-1]]]))
    return tokens, steps


def compare_with_reference(sparse: nn.Module, reference: nn.Module, ids: torch.Tensor, new_tokens: int) -> str:
    """Compare greedy decoding with the kernel backend against the torch reference backend.

    Two checks. Each kernel call is compared with the reference op on the very same input, which
    isolates the kernel's own error. The greedy tokens are compared too, but there a last-bit
    difference can move an activation across its threshold, or flip a near-tie between two tokens,
    after which the sequences legitimately part.
    """
    worst = 0.0

    def check(module, args, output):
        nonlocal worst
        if isinstance(module, SparseLinear) and module.weight_t is not None:
            expected = reference_sparse_linear(args[0], module.weight_t, module.threshold, module.bias)
            worst = max(worst, float((output - expected).abs().max()))

    handles = [m.register_forward_hook(check) for m in sparse_modules(sparse).values()]
    try:
        # Unfused, so that every kernel call passes through a module hook.
        tokens, _ = _greedy_tokens(sparse, ids, new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    expected, expected_logits = _greedy_tokens(reference, ids, new_tokens)
    same = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), new_tokens)
    kernel_error = f"max kernel error vs reference op {worst:.1e}"
    if same == new_tokens:
        return f"all {new_tokens} tokens identical; {kernel_error}"
    top = torch.topk(expected_logits[same], 2).values
    return f"first {same} of {new_tokens} tokens identical (reference top-2 logit gap there {float(top[0] - top[1]):.2f}); {kernel_error}"


def run_bench(
    dense: nn.Module,
    sparse: nn.Module,
    ids: torch.Tensor,
    backend: str,
    new_tokens: int = 64,
    repeats: int = 5,
    reference: nn.Module | None = None,
    dense_prefill: bool = False,
) -> BenchResult:
    """Decode `new_tokens` after `ids` with both models, alternating, and compare.

    Args:
        reference: the same export loaded with the torch backend; when given, the sparse tokens
            are checked against it.
        dense_prefill: run the prompt dense (the export's prefill policy "dense").
    """
    length = ids.shape[1] + new_tokens + 1
    dense_decoder, sparse_decoder = LeanDecoder(dense, length), LeanDecoder(sparse, length, fuse=True)
    warm_up = min(8, new_tokens)
    _timed_generate(dense_decoder, ids, warm_up)
    _timed_generate(sparse_decoder, ids, warm_up)
    dense_speeds, sparse_speeds = [], []
    with sparsity_control(sparse, dense_prefill=dense_prefill):
        for _ in range(repeats):
            dense_speeds.append(_timed_generate(dense_decoder, ids, new_tokens)[0])
            sparse_speeds.append(_timed_generate(sparse_decoder, ids, new_tokens)[0])
        match = "not checked" if reference is None else compare_with_reference(sparse, reference, ids, new_tokens)
    # Realized sparsity of the decoding steps only (a dense prefill keeps the prompt out of it).
    with sparsity_control(sparse, track=True, dense_prefill=True) as modules:
        sparse_decoder.generate(ids, new_tokens)
        realized = {n: 1.0 - m.kept / m.total for n, m in modules.items() if m.total}
    skipped = sum(skipped_params(n, modules[n], s) for n, s in realized.items())
    element = next(sparse.parameters()).element_size()
    dense_bytes = _weight_bytes(dense)
    sparse_bytes = dense_bytes - skipped * element
    module_ms = defaultdict(dict)
    # Unfused decoders, so that each projection's time is seen by its own hooks.
    for label, model in (("dense", dense), ("sparse", sparse)):
        for kind, ms in _time_modules(model, LeanDecoder(model, length), ids, new_tokens).items():
            module_ms[kind][label] = ms
    dense_speed, sparse_speed = statistics.median(dense_speeds), statistics.median(sparse_speeds)
    return BenchResult(
        new_tokens=new_tokens,
        repeats=repeats,
        backend=backend,
        threads=torch.get_num_threads(),
        dense_tokens_per_s=dense_speed,
        sparse_tokens_per_s=sparse_speed,
        ratio=sparse_speed / dense_speed,
        reference_match=match,
        bandwidth_gb_s=measure_bandwidth(),
        dense_bytes_per_token=dense_bytes,
        sparse_bytes_per_token=sparse_bytes,
        bound_ratio=dense_bytes / sparse_bytes,
        model_sparsity=skipped / decoder_linear_params(sparse),
        module_ms=dict(module_ms),
    )
