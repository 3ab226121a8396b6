"""Text generation with a sparse (or dense) model, following the export's prefill policy."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .decode import LeanDecoder
from .errors import UnsupportedArchitectureError
from .export import load
from .modeling import SequenceMLP, sparse_modules, sparsity_control

logger = logging.getLogger(__name__)


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float
    backend: str
    prefill: str
    # Sequence-level MLPs (GRIFFIN, TDA) only: the fraction of their neurons the prompt kept, mean over MLPs.
    prompt_kept: float | None = None


def _lean_greedy(model, ids: torch.Tensor, max_new_tokens: int, eos: int | None) -> torch.Tensor | None:
    """Greedy-decode with the lean static-cache loop; None when the model's layout is not supported."""
    try:
        decoder = LeanDecoder(model, ids.shape[1] + max_new_tokens + 1, fuse=True)
    except UnsupportedArchitectureError as exc:
        logger.info("using transformers' generate: %s", exc)
        return None
    logits = decoder.forward(ids)
    produced = []
    for _ in range(max_new_tokens):
        token = int(torch.argmax(logits))
        produced.append(token)
        if token == eos or len(produced) == max_new_tokens:
            break
        logits = decoder.forward(torch.tensor([[token]]))
    return torch.tensor(produced, dtype=torch.long)


def generate(
    model_dir: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = False,
    backend: str = "auto",
    allow_pickle: bool = False,
) -> Generation:
    """Load `model_dir` and continue `prompt`; greedy when `temperature` is 0."""
    model = load(model_dir, backend=backend, allow_pickle=allow_pickle)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    prefill = (model.moyu_config or {}).get("prefill", "sparse")
    torch.manual_seed(seed)
    options = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.eos_token_id}
    if temperature > 0:
        options["temperature"] = temperature
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    started = time.perf_counter()
    with torch.inference_mode(), sparsity_control(model, dense_prefill=prefill == "dense"):
        new = _lean_greedy(model, ids, max_new_tokens, tokenizer.eos_token_id) if temperature == 0 else None
        if new is None:
            output = model.generate(ids, attention_mask=torch.ones_like(ids), **options)
            new = output[0, ids.shape[1] :]
    seconds = time.perf_counter() - started
    text = tokenizer.decode(torch.cat([ids[0], new]), skip_special_tokens=True)
    # A sequence-level MLP keeps the prompt's selection, so it is read here without tracking, which
    # would turn off the fused kernel calls and slow the decoding timed above.
    selecting = [m for m in sparse_modules(model).values() if isinstance(m, SequenceMLP) and m.selected]
    prompt_kept = sum(m.selected[0].numel() / m.neurons for m in selecting) / len(selecting) if selecting else None
    backend_name = model.moyu_backend or "dense"
    return Generation(text, int(new.numel()), seconds, backend_name, prefill if model.moyu_config else "dense", prompt_kept)
