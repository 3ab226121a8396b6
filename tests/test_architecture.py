"""Discovery of decoder layers, linears and gated MLPs on tiny Llama, Mistral, Qwen2 and Gemma 3.

CPU only, builds its own tiny checkpoints: `pytest tests/test_architecture.py`.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from moyu_cli.architecture import discover, match_targets
from moyu_cli.errors import UnsupportedArchitectureError

from conftest import ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_discovers_seven_linears_per_layer(tiny_checkpoints, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch])
    layout = discover(model)
    assert len(layout.linears) == 2 * 7
    assert len(layout.mlps) == 2
    leaves = sorted({name.rsplit(".", 1)[-1] for name in layout.linears})
    assert leaves == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert set(layout.layer_of.values()) == {0, 1}


def test_unsupported_architecture_is_named():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedArchitectureError, match=r"GPT2LMHeadModel \(model_type='gpt2'\)"):
        discover(model)


def test_match_targets():
    names = ["m.layers.0.self_attn.q_proj", "m.layers.0.mlp.down_proj", "m.layers.1.mlp.down_proj"]
    assert match_targets(names, ["q_proj"], []) == names[:1]
    assert match_targets(names, ["all"], ["re:layers\\.1\\."]) == names[:2]
    assert match_targets(names, ["re:mlp"], []) == names[1:]
    assert match_targets(names, ["m.layers.1.mlp.down_proj"], []) == names[2:]
    assert match_targets(names, ["proj"], []) == []
