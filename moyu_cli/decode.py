"""A lean decode loop with a static KV cache, for dense and sparse models alike.

Hugging Face's `generate` adds per-token work around the model (cache objects, mask builders,
output classes). This loop calls the model's own modules (norms, projections, MLPs, rotary
embedding, embedding and head) directly. It writes keys and values into preallocated buffers and
builds no masks while decoding, so the time left is mostly weight reads, which sparsity cuts. On
SmolLM2-135M (fp32, 2 threads, benchmarks/bench_decode.py) it decoded 19.4 tokens/s against 18.2
for `generate`; most of a dense step is the batch-1 `F.linear` calls themselves.

Supported layouts: Llama-style layers (Llama, Mistral, Qwen2: input norm, attention, norm, MLP) and
Gemma 3 layers (sandwich norms, q/k norms, sliding-window layers, per-layer-type rotary). Other
models raise `UnsupportedArchitectureError`; use `model.generate` for them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import _describe, find_decoder_layers, text_config
from .errors import UnsupportedArchitectureError


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _fast_norm(module: nn.Module, dtype: torch.dtype):
    """Return `module` as one fused `F.rms_norm` call where its float32 math is known, else `module`.

    transformers' RMSNorm runs about seven small ops; fused, the 61 norms of a SmolLM2 decode step
    cost less than a millisecond. Known forms: Llama's `weight * norm(x)` (attribute
    `variance_epsilon`) and Gemma's `(1 + weight) * norm(x)`.
    """
    weight = getattr(module, "weight", None)
    if dtype != torch.float32 or not isinstance(weight, torch.Tensor):
        return module
    name = type(module).__name__
    if hasattr(module, "variance_epsilon") and name.endswith("RMSNorm") and not name.startswith("Gemma"):
        scale, eps = weight, module.variance_epsilon
    elif name.startswith("Gemma") and name.endswith("RMSNorm") and hasattr(module, "eps"):
        scale, eps = 1.0 + weight.float(), module.eps
    else:
        return module
    shape = tuple(weight.shape)
    return lambda x: F.rms_norm(x, shape, scale, eps)


@dataclass
class _Fused:
    """Sibling sparse projections that share their input and threshold, run as one kernel call."""

    modules: list[nn.Module]
    weight_t: torch.Tensor  # [K, sum of N], the modules' transposed weights side by side
    threshold: torch.Tensor
    bias: torch.Tensor | None
    sizes: list[int]

    @classmethod
    def build(cls, modules: list[nn.Module]) -> "_Fused | None":
        from .modeling import SparseLinear

        first = modules[0]
        if not all(isinstance(m, SparseLinear) and m.weight_t is not None for m in modules):
            return None
        if not all(m.backend is first.backend and torch.equal(m.threshold, first.threshold) for m in modules):
            return None
        biases = [m.bias for m in modules]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else torch.zeros(m.out_features) for b, m in zip(biases, modules)])
        return cls(modules, torch.cat([m.weight_t for m in modules], dim=1).contiguous(), first.threshold, bias,
                   [m.out_features for m in modules])

    def usable(self, x: torch.Tensor) -> bool:
        # The fused call skips the modules' own forward, so it is taken only where that forward
        # would run the plain sparse kernel: no tracking, no dense prefix, no dense prefill.
        module = self.modules[0]
        return (module.enabled and not module.track and module.dense_prefix == 0
                and not (module.dense_prefill and x.shape[-2] > 1) and x.shape[-2] <= 8)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.usable(x):
            return [module(x) for module in self.modules]
        y = self.modules[0].backend.sparse_linear(x, self.weight_t, self.threshold, self.bias)
        return list(torch.split(y, self.sizes, dim=-1))


@dataclass
class _Layer:
    attn: nn.Module
    # Norms are callables: a fused F.rms_norm where the math is known, else the module itself.
    input_norm: Callable[[torch.Tensor], torch.Tensor]
    post_attn_norm: Callable[[torch.Tensor], torch.Tensor]
    pre_mlp_norm: Callable[[torch.Tensor], torch.Tensor] | None  # Gemma: before the MLP; None for Llama-style layers
    post_mlp_norm: Callable[[torch.Tensor], torch.Tensor] | None
    mlp: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    window: int | None
    rope_key: str | None
    q_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    k_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    qkv: _Fused | None = None
    gate_up: _Fused | None = None


class LeanDecoder:
    """Greedy decoding of one sequence (batch 1) with a static KV cache.

    Args:
        model: a causal LM from transformers, with or without moyu's sparse modules.
        max_length: prompt plus generated tokens; sets the cache size.
        fuse: run q/k/v, and gate/up of Llama-style MLPs, as one kernel call each when they are
            sparse with the same threshold (uniform recipes). This keeps a second, concatenated
            copy of those weights.
    """

    def __init__(self, model: nn.Module, max_length: int, fuse: bool = False):
        self.model = model
        self.max_length = max_length
        config = text_config(model)
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise UnsupportedArchitectureError(f"the lean decoder does not implement attention logit softcapping ({_describe(model)})")
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        _, layers = find_decoder_layers(model)
        self.backbone = model.get_submodule(self._backbone_path(model))
        dtype = next(model.parameters()).dtype
        self.layers = [self._describe_layer(layer, config, model, dtype) for layer in layers]
        self.final_norm = _fast_norm(self.backbone.norm, dtype)
        if fuse:
            for layer in self.layers:
                attn, mlp = layer.attn, layer.mlp
                layer.qkv = _Fused.build([attn.q_proj, attn.k_proj, attn.v_proj])
                if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                    layer.gate_up = _Fused.build([mlp.gate_proj, mlp.up_proj])
        self.keys = [torch.zeros(1, l.kv_heads, max_length, l.head_dim, dtype=dtype) for l in self.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.rope = self._rope_tables(config, dtype)
        self.length = 0

    @staticmethod
    def _backbone_path(model: nn.Module) -> str:
        path, _ = find_decoder_layers(model)
        return path.rsplit(".", 1)[0]

    def _describe_layer(self, layer: nn.Module, config, model, dtype: torch.dtype) -> _Layer:
        attn = getattr(layer, "self_attn", None)
        needed = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or not all(hasattr(attn, n) for n in needed) or not hasattr(layer, "mlp"):
            raise UnsupportedArchitectureError(f"the lean decoder does not know the layer layout of {_describe(model)}")
        gemma = hasattr(layer, "pre_feedforward_layernorm")
        head_dim = attn.head_dim
        return _Layer(
            attn=attn,
            input_norm=_fast_norm(layer.input_layernorm, dtype),
            post_attn_norm=_fast_norm(layer.post_attention_layernorm, dtype),
            pre_mlp_norm=_fast_norm(layer.pre_feedforward_layernorm, dtype) if gemma else None,
            post_mlp_norm=_fast_norm(layer.post_feedforward_layernorm, dtype) if gemma else None,
            q_norm=_fast_norm(attn.q_norm, dtype) if hasattr(attn, "q_norm") else None,
            k_norm=_fast_norm(attn.k_norm, dtype) if hasattr(attn, "k_norm") else None,
            mlp=layer.mlp,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            scaling=getattr(attn, "scaling", head_dim**-0.5),
            window=getattr(attn, "sliding_window", None),
            rope_key=getattr(attn, "layer_type", None) if gemma else None,
        )

    def _rope_tables(self, config, dtype) -> dict:
        rotary = self.backbone.rotary_emb
        positions = torch.arange(self.max_length)[None]
        probe = torch.zeros(1, 1, dtype=dtype)
        takes_type = "layer_type" in inspect.signature(rotary.forward).parameters
        tables = {}
        for key in {layer.rope_key for layer in self.layers}:
            cos, sin = rotary(probe, positions, key) if takes_type and key is not None else rotary(probe, positions)
            tables[key] = (cos[0], sin[0])  # [max_length, head_dim]
        return tables

    def reset(self) -> None:
        self.length = 0

    def _attention(self, index: int, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        steps = h.shape[1]
        start, end = self.length, self.length + steps
        attn = layer.attn

        if layer.qkv is not None:
            q, k, v = layer.qkv(h)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = q.view(1, steps, layer.heads, layer.head_dim).transpose(1, 2)
        k = k.view(1, steps, layer.kv_heads, layer.head_dim).transpose(1, 2)
        v = v.view(1, steps, layer.kv_heads, layer.head_dim).transpose(1, 2)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)

        cos, sin = self.rope[layer.rope_key]
        cos, sin = cos[start:end], sin[start:end]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.keys[index][:, :, start:end] = k
        self.values[index][:, :, start:end] = v

        # The earliest key any query of this block may attend to: query `start` reaches back to
        # position start - window + 1.
        first = 0 if layer.window is None else max(0, start - layer.window + 1)
        keys, values = self.keys[index][:, :, first:end], self.values[index][:, :, first:end]
        mask = None
        if steps > 1:
            # Prefill: causal (and banded for sliding-window layers) over the new block.
            query_pos = torch.arange(start, end)[:, None]
            key_pos = torch.arange(first, end)[None]
            allowed = key_pos <= query_pos
            if layer.window is not None:
                allowed &= query_pos - key_pos < layer.window
            mask = allowed

        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=layer.scaling, enable_gqa=True)
        return attn.o_proj(out.transpose(1, 2).reshape(1, steps, layer.heads * layer.head_dim))

    @staticmethod
    def _mlp(layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        if layer.gate_up is None:
            return layer.mlp(h)
        gate, up = layer.gate_up(h)
        return layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Run `ids [1, T]` at the current position; returns the logits of the last position `[vocab]`."""
        if self.length + ids.shape[1] > self.max_length:
            raise ValueError(
                f"sequence would reach {self.length + ids.shape[1]} tokens but the cache holds {self.max_length}; "
                "create the LeanDecoder with a larger max_length")
        x = self.backbone.embed_tokens(ids)
        for index, layer in enumerate(self.layers):
            attended = self._attention(index, layer, layer.input_norm(x))
            if layer.pre_mlp_norm is None:
                x = x + attended
                x = x + self._mlp(layer, layer.post_attn_norm(x))
            else:
                x = x + layer.post_attn_norm(attended)
                x = x + layer.post_mlp_norm(self._mlp(layer, layer.pre_mlp_norm(x)))
        self.length += ids.shape[1]
        logits = self.model.lm_head(self.final_norm(x[:, -1:]))[0, 0]
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def generate(self, ids: torch.Tensor, new_tokens: int) -> list[int]:
        """Greedy-decode `new_tokens` after the prompt `ids [1, T]`; returns the new token ids."""
        self.reset()
        logits = self.forward(ids)
        produced = []
        for _ in range(new_tokens):
            token = int(torch.argmax(logits))
            produced.append(token)
            if len(produced) == new_tokens:
                break
            logits = self.forward(torch.tensor([[token]]))
        return produced
