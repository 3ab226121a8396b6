"""Sequence-level MLP selection (GRIFFIN, modeling.SequenceMLP): the selection rule and its runtime.

CPU only, tiny checkpoints: `pytest tests/test_sequence.py`.
"""

import pytest
import torch
from transformers import AutoTokenizer

import moyu_cli
from moyu_cli.calibrate import calibrate
from moyu_cli.data import read_text
from moyu_cli.decode import LeanDecoder
from moyu_cli.evaluate import perplexity
from moyu_cli.export import convert
from moyu_cli.modeling import SequenceMLP, sparsity_control
from moyu_cli.recipe import load_recipe


@pytest.fixture(scope="module")
def exported(tiny_llama, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("sequence")
    calibrate(tiny_llama, [str(text_file)], root / "llama.calib", tokens=1024, window=128)
    out = root / "griffin"
    convert(tiny_llama, root / "llama.calib", load_recipe("griffin-teal").with_sparsity(0.5), out, eval_windows=0)
    return out


def _expected_selection(mlp: SequenceMLP, prompt: torch.Tensor) -> torch.Tensor:
    """The GRIFFIN rule written out: top `keep` neurons by the column norm of the row-normalized activations."""
    active = mlp.act_fn(mlp.gate_proj(prompt)) * mlp.up_proj(prompt)
    score = torch.stack([(row / row.norm()).pow(2) for row in active[0]]).sum(0)
    return torch.topk(score, mlp.keep).indices.sort().values


def _tiny_mlp(hidden: int = 8, neurons: int = 16) -> torch.nn.Module:
    mlp = torch.nn.Module()
    mlp.gate_proj, mlp.up_proj = torch.nn.Linear(hidden, neurons, bias=False), torch.nn.Linear(hidden, neurons, bias=False)
    mlp.down_proj, mlp.act_fn = torch.nn.Linear(neurons, hidden, bias=False), torch.nn.SiLU()
    return mlp


def _masked_mlp(mlp: SequenceMLP, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    active = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    mask = torch.zeros(mlp.neurons, dtype=torch.bool)
    mask[selected] = True
    return mlp.down_proj(torch.where(mask, active, torch.zeros(())))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_prompt_selects_decode_neurons(exported, backend):
    model = moyu_cli.load(exported, backend=backend)
    mlp = model.get_submodule("model.layers.0.mlp")
    assert isinstance(mlp, SequenceMLP) and mlp.keep == mlp.neurons // 2
    torch.manual_seed(0)
    prompt, token = torch.randn(1, 6, 64), torch.randn(1, 1, 64)
    with torch.no_grad():
        dense_prompt = mlp.down_proj(mlp.act_fn(mlp.gate_proj(prompt)) * mlp.up_proj(prompt))
        torch.testing.assert_close(mlp(prompt), dense_prompt, rtol=1e-5, atol=1e-5)
        selected = _expected_selection(mlp, prompt)
        assert torch.equal(mlp.selected[0], selected)
        torch.testing.assert_close(mlp(token), _masked_mlp(mlp, token, selected), rtol=1e-4, atol=1e-5)
        # The selection stays until the next prompt.
        assert torch.equal(mlp.selected[0], selected)


def test_dense_prefix_is_the_prompt(exported):
    model = moyu_cli.load(exported, backend="torch")
    mlp = model.get_submodule("model.layers.1.mlp")
    x = torch.randn(1, 10, 64)
    with torch.no_grad(), sparsity_control(model, dense_prefix=4, track=True):
        y = mlp(x)
        selected = _expected_selection(mlp, x[:, :4])
        torch.testing.assert_close(y[:, 4:], _masked_mlp(mlp, x[:, 4:], selected), rtol=1e-5, atol=1e-5)
        assert (mlp.kept, mlp.total) == (6 * mlp.keep, 6 * mlp.neurons)


def test_batch_rows_select_separately(exported):
    model = moyu_cli.load(exported, backend="torch")
    mlp = model.get_submodule("model.layers.0.mlp")
    prompts, tokens = torch.randn(2, 5, 64), torch.randn(2, 1, 64)
    with torch.no_grad():
        mlp(prompts)
        out = mlp(tokens)
        for row in range(2):
            selected = _expected_selection(mlp, prompts[row : row + 1])
            torch.testing.assert_close(out[row : row + 1], _masked_mlp(mlp, tokens[row : row + 1], selected), rtol=1e-5, atol=1e-5)


def test_zero_sparsity_is_dense(exported):
    model = moyu_cli.load(exported, backend="torch")
    for module in model.modules():
        if isinstance(module, SequenceMLP):
            module.keep = module.neurons
    x = torch.randn(1, 7, 64)
    with torch.no_grad():
        with sparsity_control(model, dense_prefix=3):
            sparse = model.model.layers[0].mlp(x)
        with sparsity_control(model, enabled=False):
            dense = model.model.layers[0].mlp(x)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


def test_lean_decoder_and_eval(exported, text_file):
    model = moyu_cli.load(exported, backend="torch")
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = torch.tensor([tokenizer("The function returns a value").input_ids])
    decoder = LeanDecoder(model, max_length=ids.shape[1] + 6)
    produced = decoder.generate(ids, 6)
    # The same tokens from the plain forward: the prompt selects, then one position per call.
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=True)
        past, expected = logits.past_key_values, []
        token = int(logits.logits[0, -1].argmax())
        for _ in range(6):
            expected.append(token)
            out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
    assert produced == expected
    result = perplexity(model, tokenizer, [read_text(text_file)], window=128, max_windows=2, protocol="half-dense")
    mlp_sparsity = [v for k, v in result.module_sparsity.items() if k.endswith(".mlp")]
    assert mlp_sparsity and all(v == pytest.approx(0.5, abs=0.01) for v in mlp_sparsity)


@pytest.fixture(scope="module")
def tda_export(tiny_llama, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("tda")
    calibrate(tiny_llama, [str(text_file)], root / "llama.calib", tokens=1024, window=128)
    out = root / "tda"
    recipe = load_recipe("tda-mlp").with_sparsity(0.6)
    config = convert(tiny_llama, root / "llama.calib", recipe, out, eval_windows=2)
    return out, config


def test_convert_measures_selection_half_dense(tda_export):
    """The strict protocol has no prompt, so convert measures sequence-level recipes half-dense."""
    evaluation = tda_export[1]["evaluation"]
    assert evaluation["protocol"] == "half-dense"
    assert evaluation["model_sparsity"] > 0.2


def test_tda_thresholds_per_prompt_length(tiny_llama, tda_export, text_file):
    """At each prompt length, the threshold skips the target fraction of the shares of its calibration prompts, recomputed here."""
    from moyu_cli.calibrate import load_calibration
    from moyu_cli.checkpoint import load_model
    from moyu_cli.export import _calibration_windows
    from moyu_cli.modeling import prompt_scores

    out, config = tda_export
    model, tokenizer = load_model(tiny_llama)
    modifier = load_recipe("tda-mlp").modifiers[0]
    calibration = load_calibration(config["calibration"]["file"])
    prompts = _calibration_windows(calibration, tokenizer, "test", modifier.tokens, modifier.seed)[:, :64]
    lengths = [1, 2, 4, 8, 16, 32, 64]
    shares = {}
    for length in lengths:
        hooks = [
            model.get_submodule(name).register_forward_hook(
                lambda module, args, output, name=name, length=length: shares.__setitem__(
                    (name, length), prompt_scores(module.act_fn(module.gate_proj(args[0])) * module.up_proj(args[0]))
                )
            )
            for name in config["modules"]
        ]
        with torch.no_grad():
            model(input_ids=prompts[:, :length])  # a prompt of `length` tokens, run on its own
        for hook in hooks:
            hook.remove()
    for name, entry in config["modules"].items():
        assert entry["kind"] == "sequence_mlp"
        assert entry["prompt_lengths"] == lengths
        assert "channels" not in entry  # the thresholds are per prompt length, not per channel
        for length, threshold in zip(lengths, entry["thresholds"]):
            skipped = float((shares[name, length] <= threshold).float().mean())
            assert skipped == pytest.approx(0.6, abs=0.01), (name, length)
        # Shorter prompts have more uneven shares: most neurons get less than on a long prompt, so the
        # threshold that skips the same fraction is lower.
        assert entry["thresholds"][0] < entry["thresholds"][-1], name
        skipped = float((shares[name, 64] <= entry["thresholds"][-1]).float().mean())
        assert entry["calibrated_sparsity"] == pytest.approx(skipped, abs=1e-6), name


def test_tda_threshold_log_interpolation():
    mlp = SequenceMLP(_tiny_mlp(), 0.5, "torch", None, [0.4, 0.2, 0.1], [4, 16, 64])
    assert [mlp.threshold_for(n) for n in (1, 4, 16, 64, 500)] == [0.4, 0.4, 0.2, 0.1, 0.1]
    assert mlp.threshold_for(8) == pytest.approx(0.3)  # halfway between 4 and 16 in log length
    assert mlp.threshold_for(32) == pytest.approx(0.15)
    assert mlp.threshold == 0.1
    single = SequenceMLP(_tiny_mlp(), 0.5, "torch", None, 0.25)  # an export from before prompt lengths
    assert single.threshold_for(3) == single.threshold_for(300) == 0.25
    with pytest.raises(ValueError, match="invalid TDA thresholds: 3 values for the prompt lengths \\[4, 16\\]"):
        SequenceMLP(_tiny_mlp(), 0.5, "torch", None, [0.4, 0.2, 0.1], [4, 16])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_tda_keeps_neurons_above_threshold(tda_export, backend):
    out, _ = tda_export
    model = moyu_cli.load(out, backend=backend)
    mlp = model.get_submodule("model.layers.1.mlp")
    assert isinstance(mlp, SequenceMLP) and mlp.threshold is not None
    torch.manual_seed(0)
    prompts, tokens = torch.randn(2, 6, 64), torch.randn(2, 1, 64)
    # The second prompt points along one neuron's gate row, so that neuron dominates its energy.
    prompts[1] = prompts[1] * 0.01 + mlp.gate_proj.weight[3] * 50
    with torch.no_grad(), sparsity_control(model, track=True):
        mlp(prompts)
        out = mlp(tokens)
        counts = [indices.numel() for indices in mlp.selected]
        for row in range(2):
            active = mlp.act_fn(mlp.gate_proj(prompts[row : row + 1])) * mlp.up_proj(prompts[row : row + 1])
            share = torch.stack([(p / p.norm()).pow(2) for p in active[0]]).mean(0)
            expected = torch.nonzero(share > mlp.threshold_for(6)).flatten()
            assert torch.equal(mlp.selected[row], expected)
            torch.testing.assert_close(out[row : row + 1], _masked_mlp(mlp, tokens[row : row + 1], expected), rtol=1e-4, atol=1e-5)
        assert counts[0] != counts[1], "the kept count must follow the prompt"
        assert (mlp.kept, mlp.total) == (sum(counts), 2 * mlp.neurons)


def test_tda_single_threshold_export_loads(tda_export, tmp_path):
    """An export from before per-length thresholds (one value, no prompt lengths) uses it for every prompt."""
    import shutil

    from safetensors.torch import load_file, save_file

    from moyu_cli.errors import CheckpointError

    out, _ = tda_export
    old = tmp_path / "old"
    shutil.copytree(out, old)
    tensors = load_file(old / "moyu_thresholds.safetensors")
    name = "model.layers.1.mlp"
    longest = float(tensors[f"{name}.threshold"][-1])
    tensors = {key: value[-1:] for key, value in tensors.items() if key.endswith(".threshold")}
    save_file(tensors, old / "moyu_thresholds.safetensors")
    mlp = moyu_cli.load(old, backend="torch").get_submodule(name)
    assert mlp.prompt_lengths is None
    assert mlp.threshold_for(3) == pytest.approx(longest)
    assert mlp.threshold_for(300) == pytest.approx(longest)

    tensors[f"{name}.prompt_lengths"] = torch.tensor([1, 2])  # two lengths for one threshold
    save_file(tensors, old / "moyu_thresholds.safetensors")
    with pytest.raises(CheckpointError, match=f"module {name} has 1 thresholds for 2 prompt lengths; re-export"):
        moyu_cli.load(old, backend="torch")


@pytest.mark.parametrize(
    "change, message",
    [
        ("nan", "has NaN thresholds"),
        ("no lengths", "has 7 prompt thresholds but no model.layers.1.mlp.prompt_lengths"),
        ("decreasing", "prompt lengths of module model.layers.1.mlp are \\[256, 128"),
    ],
)
def test_tda_export_invalid_thresholds(tda_export, tmp_path, change, message):
    import shutil

    from safetensors.torch import load_file, save_file

    from moyu_cli.errors import CheckpointError

    out, _ = tda_export
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    tensors = load_file(bad / "moyu_thresholds.safetensors")
    name = "model.layers.1.mlp"
    assert tensors[f"{name}.threshold"].numel() == 7  # prompts of 1, 2, 4, ..., 64 tokens (half the 128-token window)
    if change == "nan":
        tensors[f"{name}.threshold"][3] = float("nan")
    elif change == "no lengths":
        del tensors[f"{name}.prompt_lengths"]
    else:
        tensors[f"{name}.prompt_lengths"] = tensors[f"{name}.prompt_lengths"].flip(0) * 4
    save_file(tensors, bad / "moyu_thresholds.safetensors")
    with pytest.raises(CheckpointError, match=message):
        moyu_cli.load(bad, backend="torch")


def test_generate_reports_prompt_kept(tda_export):
    """generate() reports the fraction of MLP neurons the prompt kept, as the MLPs selected them."""
    from moyu_cli.generate import generate

    out, _ = tda_export
    prompt = "The function returns a value"
    result = generate(out, prompt, max_new_tokens=4, backend="torch")
    model = moyu_cli.load(out, backend="torch")
    ids = AutoTokenizer.from_pretrained(out)(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        model(input_ids=ids)
    mlps = [m for m in model.modules() if isinstance(m, SequenceMLP)]
    expected = sum(m.selected[0].numel() / m.neurons for m in mlps) / len(mlps)
    assert result.prompt_kept == pytest.approx(expected)
    assert 0 < result.prompt_kept < 1


def test_tda_prompt_longer_than_window(tiny_llama, text_file, tmp_path):
    from moyu_cli.errors import RecipeError
    from moyu_cli.recipe import parse_recipe

    calibrate(tiny_llama, [str(text_file)], tmp_path / "c.calib", tokens=512, window=128)
    recipe = parse_recipe({
        "version": 1, "name": "long", "sparsity": 0.5, "prefill": "dense",
        "modifiers": [{"type": "sequence_mlp", "targets": ["mlp"], "selection": "threshold", "prompt_tokens": 256}],
    })
    with pytest.raises(RecipeError, match="prompt_tokens 256 is longer than the calibration window 128"):
        convert(tiny_llama, tmp_path / "c.calib", recipe, tmp_path / "out", eval_windows=0)
    assert not (tmp_path / "out").exists()
