"""Calibrate -> convert -> load -> eval -> generate on tiny models, and the sparse forward semantics.

CPU only; builds its own tiny checkpoints: `pytest tests/test_pipeline.py`.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import moyu_cli
from moyu_cli.calibrate import calibrate, load_calibration
from moyu_cli.data import read_text
from moyu_cli.evaluate import perplexity
from moyu_cli.export import convert
from moyu_cli.generate import generate
from moyu_cli.modeling import SparseGatedMLP, SparseLinear, sparse_modules, sparsity_control
from moyu_cli.recipe import RecoverySettings, load_recipe, shipped_recipes_dir
from moyu_cli.decode import LeanDecoder

from conftest import ARCHITECTURES


@pytest.fixture(scope="module")
def calibrations(tiny_checkpoints, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    return {
        arch: (calibrate(path, [str(text_file)], root / f"{arch}.calib", tokens=2048, window=128), root / f"{arch}.calib")
        for arch, path in tiny_checkpoints.items()
    }


def test_calibration_metadata(calibrations, tiny_llama, text_file):
    metadata, path = calibrations["llama"]
    assert metadata["tokens"] == 2048
    assert metadata["window"] == 128
    assert metadata["data"][0]["name"] == str(text_file)
    assert len(metadata["data"][0]["sha256"]) == 64
    assert metadata["model"]["model_type"] == "llama"
    calibration = load_calibration(path)
    # q/k/v share one site and gate/up share one site: 4 linear input sites + 1 gate site per layer.
    assert len(calibration.sites) == 2 * 5
    assert calibration.site_of["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj.input"
    assert calibration.site_of["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj.input"
    stats = calibration.sites["model.layers.0.mlp.down_proj.input"]
    assert stats.count == 2048
    assert stats.histogram.sum() == 2048 * 160


def test_calibration_memory_does_not_grow_with_tokens(calibrations, tiny_llama, text_file, tmp_path):
    small = load_calibration(calibrations["llama"][1])
    calibrate(tiny_llama, [str(text_file)], tmp_path / "big.calib", tokens=4096, window=128)
    big = load_calibration(tmp_path / "big.calib")
    for site, stats in big.sites.items():
        assert stats.histogram.shape == small.sites[site].histogram.shape
    assert (tmp_path / "big.calib").stat().st_size == calibrations["llama"][1].stat().st_size


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("recipe_name", ["teal-uniform", "cats-mlp"])
def test_convert_load_eval(tiny_checkpoints, calibrations, text_file, tmp_path, arch, recipe_name):
    out = tmp_path / "out"
    recipe = load_recipe(recipe_name).with_sparsity(0.5)
    config = convert(tiny_checkpoints[arch], calibrations[arch][1], recipe, out, eval_data=[str(text_file)], eval_windows=2)
    assert config["format_version"] == 1
    assert config["recipe"]["sparsity"] == 0.5
    assert config["evaluation"]["windows"] == 2
    expected = 14 if recipe_name == "teal-uniform" else 2
    assert len(config["modules"]) == expected
    for entry in config["modules"].values():
        assert entry["calibrated_sparsity"] == pytest.approx(0.5, abs=0.01)

    model = moyu_cli.load(out, backend="torch")
    kinds = {type(m) for m in sparse_modules(model).values()}
    assert kinds == ({SparseLinear} if recipe_name == "teal-uniform" else {SparseGatedMLP})
    tokenizer = AutoTokenizer.from_pretrained(out)
    result = perplexity(model, tokenizer, [read_text(text_file)], window=128, max_windows=8)
    assert len(result.module_sparsity) == expected
    # The calibration text is the evaluation text here, so the first sparse module, whose input
    # no other sparse module changes, sits on target; later ones drift because their inputs come
    # from sparsified layers while calibration saw dense ones.
    first = next(iter(result.module_sparsity))
    assert result.module_sparsity[first] == pytest.approx(0.5, abs=0.03), first
    for name, value in result.module_sparsity.items():
        assert value == pytest.approx(0.5, abs=0.15), name
    assert 0.1 < result.model_sparsity < 0.6
    assert torch.isfinite(torch.tensor(result.perplexity))


def test_export_loads_in_plain_transformers(tiny_llama, calibrations, tmp_path):
    out = tmp_path / "out"
    convert(tiny_llama, calibrations["llama"][1], load_recipe("teal-uniform"), out, eval_windows=0)
    ids = torch.arange(3, 40)[None]
    plain = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, original(ids).logits)
    names = json.loads((out / "moyu.json").read_text())["modules"]
    with safe_open(out / "moyu_thresholds.safetensors", "pt") as handle:
        assert sorted(k.removesuffix(".threshold") for k in handle.keys()) == sorted(names)


def test_sparse_linear_matches_masked_reference(tiny_llama, calibrations, tmp_path):
    out = tmp_path / "out"
    convert(tiny_llama, calibrations["llama"][1], load_recipe("teal-uniform"), out, eval_windows=0)
    model = moyu_cli.load(out, backend="torch")
    module = model.get_submodule("model.layers.1.mlp.down_proj")
    x = torch.randn(1, 5, module.in_features)
    kept = torch.where(x.abs() > module.threshold, x, torch.zeros(()))
    expected = kept @ module.weight.t()
    assert torch.equal(module(x), expected)
    with sparsity_control(model, enabled=False):
        assert torch.equal(module(x), x @ module.weight.t())
    with sparsity_control(model, dense_prefix=2):
        mixed = module(x)
        # Different row counts may take different BLAS paths, so allow float rounding here.
        torch.testing.assert_close(mixed[:, :2], (x @ module.weight.t())[:, :2], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mixed[:, 2:], expected[:, 2:], rtol=1e-6, atol=1e-6)


def test_gated_mlp_matches_reference(tiny_llama, calibrations, tmp_path):
    out = tmp_path / "out"
    convert(tiny_llama, calibrations["llama"][1], load_recipe("cats-mlp"), out, eval_windows=0)
    model = moyu_cli.load(out, backend="torch")
    mlp = model.get_submodule("model.layers.0.mlp")
    x = torch.randn(1, 4, 64)
    gate = mlp.act_fn(mlp.gate_proj(x))
    gate = torch.where(gate.abs() > mlp.threshold, gate, torch.zeros(()))
    expected = mlp.down_proj(gate * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)


def test_half_dense_protocol_is_closer_to_dense(tiny_llama, calibrations, text_file, tmp_path):
    out = tmp_path / "out"
    convert(tiny_llama, calibrations["llama"][1], load_recipe("teal-uniform").with_sparsity(0.7), out, eval_windows=0)
    model = moyu_cli.load(out, backend="torch")
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = [read_text(text_file)]
    strict = perplexity(model, tokenizer, text, window=128, max_windows=4, protocol="strict")
    half = perplexity(model, tokenizer, text, window=128, max_windows=4, protocol="half-dense")
    with sparsity_control(model, enabled=False):
        dense = perplexity(model, tokenizer, text, window=128, max_windows=4)
    assert strict.targets == half.targets == dense.targets == 4 * 127
    assert abs(half.perplexity - dense.perplexity) < abs(strict.perplexity - dense.perplexity)
    assert dense.module_sparsity == {} or all(v == 0 for v in dense.module_sparsity.values())


def test_bos_windows_score_same_targets(tiny_checkpoints, text_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["gemma3_text"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["gemma3_text"])
    result = perplexity(model, tokenizer, [read_text(text_file)], window=64, max_windows=3)
    assert result.bos
    assert result.targets == 3 * 63


def test_generate_sparse_and_dense_prefill(tiny_llama, calibrations, tmp_path):
    out = tmp_path / "out"
    convert(tiny_llama, calibrations["llama"][1], load_recipe("teal-uniform"), out, eval_windows=0)
    result = generate(out, "The function", max_new_tokens=8, backend="torch")
    assert result.new_tokens == 8
    assert result.text.startswith("The function")
    assert result.prefill == "sparse"
    assert result.prompt_kept is None  # no sequence-level MLPs
    config = json.loads((out / "moyu.json").read_text())
    config["prefill"] = "dense"
    (out / "moyu.json").write_text(json.dumps(config))
    assert generate(out, "The function", max_new_tokens=4, backend="torch").prefill == "dense"


def test_sharded_checkpoint(tiny_llama, text_file, tmp_path):
    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.save_pretrained(sharded, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    calibrate(sharded, [str(text_file)], tmp_path / "c.calib", tokens=256, window=128)
    out = tmp_path / "out"
    convert(sharded, tmp_path / "c.calib", load_recipe("teal-uniform"), out, eval_windows=0)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("*.safetensors"))) == len(list(sharded.glob("*.safetensors"))) + 1
    assert len(sparse_modules(moyu_cli.load(out, backend="torch"))) == 14


def test_export_has_usual_permissions(tiny_llama, calibrations, tmp_path):
    """safetensors writes files 0600; the export gets the umask's usual modes like any other output."""
    import os

    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        convert(tiny_llama, calibrations["llama"][1], load_recipe("teal-uniform"), out, eval_windows=0)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    modes = {file.name: file.stat().st_mode & 0o777 for file in out.iterdir()}
    assert "moyu_thresholds.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o644)


@pytest.mark.parametrize("loss", [{}, {"loss_positions": 32}, {"loss_top_k": 8}], ids=["full", "positions", "top-k"])
def test_recovery_lowers_kl_and_exports_weights(loss, tiny_llama, calibrations, tmp_path):
    from safetensors.torch import load_file

    recipe = load_recipe("teal-uniform").with_sparsity(0.7)
    settings = RecoverySettings(tokens=128 * 24, lr=3e-3, dtype="float32", **loss)
    recipe = recipe.model_copy(update={"recovery": settings})
    out = tmp_path / "out"
    calls = []
    config = convert(tiny_llama, calibrations["llama"][1], recipe, out, eval_windows=0, progress=lambda *call: calls.append(call))
    report = config["recovery"]
    assert report["steps"] == 24
    assert calls == [(step, 24) for step in range(1, 25)]
    assert report["tokens"] == 24 * 128
    assert report["kl_last"] < 0.7 * report["kl_first"]
    assert report["dtype"] == "float32"
    assert report["loss_positions"] == loss.get("loss_positions")
    assert report["loss_top_k"] == loss.get("loss_top_k")
    before = load_file(tiny_llama / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("layers.0.self_attn.q_proj" in k for k in changed)
    # The embedding (tied to the LM head) is frozen; the input checkpoint is untouched.
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert load_file(tiny_llama / "model.safetensors").keys() == before.keys()


def _interrupt_after(steps: int):
    """Return a progress callback that raises Ctrl-C once `steps` recovery steps are done."""

    def progress(done, total):
        if done == steps:
            raise KeyboardInterrupt

    return progress


@pytest.mark.parametrize(
    "loss", [{}, {"hold_sparsity": True, "loss_positions": 40}, {"ramp": 0.5, "loss_top_k": 8}], ids=["plain", "held-positions", "ramp-top-k"]
)
def test_recovery_resume_matches_uninterrupted(loss, tiny_llama, calibrations, tmp_path):
    """Stopped with Ctrl-C after 5 of 12 steps and run again, recovery gives the weights and report of an uninterrupted run."""
    from safetensors.torch import load_file

    from moyu_cli.errors import RecoveryInterrupted
    from moyu_cli.export import recovery_state_path

    settings = RecoverySettings(tokens=128 * 12, lr=3e-3, dtype="float32", **loss)
    recipe = load_recipe("teal-uniform").with_sparsity(0.7).model_copy(update={"recovery": settings})
    whole = convert(tiny_llama, calibrations["llama"][1], recipe, tmp_path / "whole", eval_windows=0)
    out = tmp_path / "out"
    with pytest.raises(RecoveryInterrupted, match=r"after step 5 of 12"):
        convert(tiny_llama, calibrations["llama"][1], recipe, out, eval_windows=0, progress=_interrupt_after(5))
    assert recovery_state_path(out).is_file()
    assert not out.exists()
    resumed = convert(tiny_llama, calibrations["llama"][1], recipe, out, eval_windows=0)
    assert resumed["recovery"]["resumed_after"] == 5
    assert not recovery_state_path(out).exists()
    for key in ("kl_first", "kl_last", "steps", "tokens"):
        assert resumed["recovery"][key] == pytest.approx(whole["recovery"][key], rel=1e-6)
    assert resumed["recovery"]["teacher_reused"] == whole["recovery"]["teacher_reused"]
    expected, actual = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-7)
    thresholds = load_file(tmp_path / "whole" / "moyu_thresholds.safetensors")
    for name, threshold in load_file(out / "moyu_thresholds.safetensors").items():
        torch.testing.assert_close(threshold, thresholds[name], rtol=1e-6, atol=1e-7)


def test_recovery_state_kept_on_export_failure(tiny_llama, calibrations, tmp_path):
    """A conversion that fails after training keeps the state; the next run exports without training again."""
    from moyu_cli.errors import DataError
    from moyu_cli.export import recovery_state_path

    settings = RecoverySettings(tokens=128 * 4, lr=3e-3, dtype="float32")
    recipe = load_recipe("teal-uniform").with_sparsity(0.7).model_copy(update={"recovery": settings})
    out = tmp_path / "out"
    with pytest.raises(DataError):
        convert(tiny_llama, calibrations["llama"][1], recipe, out, eval_data=[str(tmp_path / "missing.txt")])
    assert recovery_state_path(out).is_file()
    steps = []
    config = convert(tiny_llama, calibrations["llama"][1], recipe, out, eval_windows=0, progress=lambda *call: steps.append(call))
    assert steps == []
    assert config["recovery"]["resumed_after"] == 4
    assert not recovery_state_path(out).exists()


def test_recovery_state_write_error(tiny_llama, calibrations, tmp_path, monkeypatch, caplog):
    import safetensors.torch
    from safetensors import SafetensorError

    from moyu_cli.export import recovery_state_path

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    settings = RecoverySettings(tokens=128 * 4, lr=3e-3, dtype="float32")
    recipe = load_recipe("teal-uniform").with_sparsity(0.7).model_copy(update={"recovery": settings})
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="moyu_cli.recover"):
        config = convert(tiny_llama, calibrations["llama"][1], recipe, out, eval_windows=0)
    assert config["recovery"]["steps"] == 4
    assert "failed to save the recovery state" in caplog.text
    assert "No space left on device" in caplog.text
    assert not recovery_state_path(out).exists()
    assert list(tmp_path.glob(".*tmp-*")) == []


def test_recovery_state_other_run_rejected(tiny_llama, calibrations, tmp_path, monkeypatch):
    import moyu_cli.recover
    from moyu_cli.errors import MoyuError, RecoveryInterrupted
    from moyu_cli.export import recovery_state_path

    recipe = load_recipe("teal-uniform").with_sparsity(0.7)
    settings = RecoverySettings(tokens=128 * 4, lr=3e-3, dtype="float32")
    out = tmp_path / "out"
    with pytest.raises(RecoveryInterrupted):
        convert(tiny_llama, calibrations["llama"][1], recipe.model_copy(update={"recovery": settings}), out,
                eval_windows=0, progress=_interrupt_after(2))
    other = recipe.model_copy(update={"recovery": settings.model_copy(update={"lr": 1e-3})})
    with pytest.raises(MoyuError, match=r"contains the recovery state of a different run .*; delete it or pass --no-resume to start this run"):
        convert(tiny_llama, calibrations["llama"][1], other, out, eval_windows=0)
    recovery_state_path(out).write_bytes(b"not a safetensors file")
    with pytest.raises(MoyuError, match=r"invalid recovery state file .*; delete it or pass --no-resume"):
        convert(tiny_llama, calibrations["llama"][1], other, out, eval_windows=0)
    assert not out.exists()
    # --no-resume leaves the file alone and trains from the beginning.
    config = convert(tiny_llama, calibrations["llama"][1], other, out, eval_windows=0, resume=False)
    assert config["recovery"]["resumed_after"] is None
    assert recovery_state_path(out).read_bytes() == b"not a safetensors file"


def test_resume_other_machine_dtype(tiny_llama, calibrations, tmp_path, monkeypatch):
    """A run with dtype auto, stopped where auto means float32, resumes elsewhere once the recipe names float32."""
    import moyu_cli.recover
    from moyu_cli.errors import MoyuError, RecoveryInterrupted

    auto = load_recipe("teal-uniform").with_sparsity(0.7).model_copy(
        update={"recovery": RecoverySettings(tokens=128 * 4, lr=3e-3, dtype="auto")})
    out = tmp_path / "out"
    monkeypatch.setattr(moyu_cli.recover, "resolve_dtype", lambda dtype, device: "float32" if dtype == "auto" else dtype)
    with pytest.raises(RecoveryInterrupted):
        convert(tiny_llama, calibrations["llama"][1], auto, out, eval_windows=0, progress=_interrupt_after(2))
    # Another machine, where auto means bfloat16.
    monkeypatch.setattr(moyu_cli.recover, "resolve_dtype", lambda dtype, device: "bfloat16" if dtype == "auto" else dtype)
    with pytest.raises(MoyuError, match=r"was trained with float32 compute, and this run resolves bfloat16; set the recipe's recovery.dtype to float32"):
        convert(tiny_llama, calibrations["llama"][1], auto, out, eval_windows=0)
    explicit = auto.model_copy(update={"recovery": auto.recovery.model_copy(update={"dtype": "float32"})})
    config = convert(tiny_llama, calibrations["llama"][1], explicit, out, eval_windows=0)
    assert config["recovery"]["resumed_after"] == 2


def test_resume_rejects_other_calibration(tiny_llama, calibrations, tmp_path):
    """A state trained with one calibration is not resumed with another of the same model and text."""
    from safetensors.torch import save_file

    from moyu_cli.errors import MoyuError, RecoveryInterrupted

    calib = calibrations["llama"][1]
    with safe_open(calib, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    moyu = json.loads(metadata["moyu"])
    # A calibration with another seed, and one that differs only in the time it took.
    other = tmp_path / "other.calib"
    save_file(tensors, other, metadata={"moyu": json.dumps(moyu | {"seed": moyu["seed"] + 1, "seconds": 0.5})})
    same = tmp_path / "same.calib"
    save_file(tensors, same, metadata={"moyu": json.dumps(moyu | {"seconds": 123.0})})
    recipe = load_recipe("teal-uniform").with_sparsity(0.7).model_copy(
        update={"recovery": RecoverySettings(tokens=128 * 4, lr=3e-3, dtype="float32")})
    out = tmp_path / "out"
    with pytest.raises(RecoveryInterrupted):
        convert(tiny_llama, calib, recipe, out, eval_windows=0, progress=_interrupt_after(2))
    with pytest.raises(MoyuError, match=r"contains the recovery state of a different run"):
        convert(tiny_llama, other, recipe, out, eval_windows=0)
    assert convert(tiny_llama, same, recipe, out, eval_windows=0)["recovery"]["resumed_after"] == 2


def test_ctrl_c_during_update_saved(tiny_llama, calibrations, tmp_path, monkeypatch):
    """Ctrl-C inside the optimizer's update takes effect after it, so that step is saved. Stale temporaries are removed."""
    import signal

    from moyu_cli.errors import RecoveryInterrupted
    from moyu_cli.export import recovery_state_path

    update, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # delivered while the update runs
        return update(self, *args, **kwargs)

    recipe = load_recipe("teal-uniform").with_sparsity(0.7).model_copy(
        update={"recovery": RecoverySettings(tokens=128 * 6, lr=3e-3, dtype="float32")})
    out = tmp_path / "out"
    stale = tmp_path / f".{recovery_state_path(out).name}.tmp-killed"
    stale.write_bytes(b"left by a run killed while saving")
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    # Python's own Ctrl-C handler, also where the suite runs with SIGINT ignored (under nohup).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(RecoveryInterrupted, match=r"after step 3 of 6"):
            convert(tiny_llama, calibrations["llama"][1], recipe, out, eval_windows=0)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not stale.exists()
    monkeypatch.undo()
    assert convert(tiny_llama, calibrations["llama"][1], recipe, out, eval_windows=0)["recovery"]["resumed_after"] == 3


def test_fingerprint_scalar_parameter(calibrations):
    """A 0-dim parameter is hashed like any other, and changing it changes the fingerprint."""
    from moyu_cli.export import _fingerprint

    settings = RecoverySettings(tokens=128, lr=1e-3)
    model = torch.nn.Module()
    model.scale = torch.nn.Parameter(torch.tensor(1.0))
    calibration = load_calibration(calibrations["llama"][1])
    batch = torch.zeros(1, 8, dtype=torch.long)
    first = _fingerprint(model, {}, batch, settings, calibration)
    with torch.no_grad():
        model.scale.fill_(2.0)
    assert _fingerprint(model, {}, batch, settings, calibration) != first


def test_recovery_dtype_auto():
    from moyu_cli.recover import resolve_dtype

    assert resolve_dtype("float32", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if native else "float32")


def test_kl_matches_torch():
    from moyu_cli.recover import _kl

    student, teacher = torch.randn(300, 50), torch.randn(300, 50)
    expected = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(_kl(student, teacher, chunk=128), expected, rtol=1e-5, atol=1e-6)


def _sparse_copies(path, calibration_path, copies, sparsity=0.5):
    """Return the dense model and `copies` copies of it sparsified by teal-uniform with the torch backend."""
    import copy

    from moyu_cli.architecture import discover
    from moyu_cli.checkpoint import load_model
    from moyu_cli.modeling import apply_plan
    from moyu_cli.sparsify import plan_from_recipe

    model, _ = load_model(path)
    plan = plan_from_recipe(load_recipe("teal-uniform").with_sparsity(sparsity), discover(model), load_calibration(calibration_path))
    students = [copy.deepcopy(model) for _ in range(copies)]
    for student in students:
        apply_plan(student, plan, backend="torch")
    return model, *students


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_recovery_loss_positions_subset_kl(arch, tiny_checkpoints, calibrations):
    """With loss_positions, the first step's KL is the full-logit KL at the positions the seed draws after BOS."""
    from moyu_cli.recover import _kl, recover

    teacher, student, full_student, before = _sparse_copies(tiny_checkpoints[arch], calibrations[arch][1], 3)
    batch = torch.randint(3, teacher.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    report = recover(student, teacher, batch, 1e-3, "float32", seed=3, skip_first=1, loss_positions=7)
    drawn = 1 + torch.randperm(63, generator=torch.Generator().manual_seed(3))[:7].sort().values
    with torch.no_grad():
        expected = _kl(before(input_ids=batch).logits[0, drawn], teacher(input_ids=batch).logits[0, drawn])
    assert report.loss_positions == 7
    assert report.kl_first == pytest.approx(expected.item(), rel=1e-4)
    # A count at or above the number of scored positions gives the full loss.
    full = recover(full_student, teacher, batch, 1e-3, "float32", skip_first=1, loss_positions=63)
    with torch.no_grad():
        expected = _kl(before(input_ids=batch).logits[0, 1:], teacher(input_ids=batch).logits[0, 1:])
    assert full.loss_positions is None
    assert full.kl_first == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_recovery_loss_top_k_kl(arch, tiny_checkpoints, calibrations):
    """With loss_top_k, the first step's KL is the KL over the union of the dense model's top-k tokens, renormalized."""
    from moyu_cli.recover import _kl, recover

    teacher, student, full_student, before = _sparse_copies(tiny_checkpoints[arch], calibrations[arch][1], 3)
    batch = torch.randint(3, teacher.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    report = recover(student, teacher, batch, 1e-3, "float32", skip_first=1, loss_top_k=3)
    with torch.no_grad():
        dense, sparse = teacher(input_ids=batch).logits[0, 1:], before(input_ids=batch).logits[0, 1:]
    tokens = dense.topk(3, dim=-1).indices.unique()
    assert report.loss_top_k == 3
    assert report.loss_tokens == tokens.numel() < teacher.config.vocab_size
    assert report.loss_mass == pytest.approx(F.softmax(dense, -1)[:, tokens].sum(-1).mean().item(), rel=1e-4)
    # _kl renormalizes over the columns it is given.
    assert report.kl_first == pytest.approx(_kl(sparse[:, tokens], dense[:, tokens]).item(), rel=1e-4)
    # With k at least the vocabulary, the loss is the full KL.
    full = recover(full_student, teacher, batch, 1e-3, "float32", skip_first=1, loss_top_k=teacher.config.vocab_size)
    assert full.loss_tokens == teacher.config.vocab_size
    assert full.loss_mass == pytest.approx(1.0)
    assert full.kl_first == pytest.approx(_kl(sparse, dense).item(), rel=1e-4)


def test_recovery_reuses_repeated_windows(tiny_llama, calibrations, monkeypatch):
    """With loss_top_k, a window seen again takes the dense model's outputs from before, and training is the same."""
    import moyu_cli.recover
    from moyu_cli.recover import recover

    teacher, cached, uncached = _sparse_copies(tiny_llama, calibrations["llama"][1], 2)
    windows = torch.randint(3, teacher.config.vocab_size, (3, 48), generator=torch.Generator().manual_seed(0))
    batch = windows[[0, 1, 2, 1, 0, 2, 0]]
    report = recover(cached, teacher, batch, 3e-3, "float32", skip_first=1, loss_top_k=4)
    assert report.teacher_reused == 4
    calls = []
    monkeypatch.setattr(moyu_cli.recover, "TEACHER_CACHE_BYTES", 0)
    monkeypatch.setattr(teacher.model, "forward", lambda *args, forward=teacher.model.forward, **kwargs: calls.append(1) or forward(*args, **kwargs))
    again = recover(uncached, teacher, batch, 3e-3, "float32", skip_first=1, loss_top_k=4)
    assert again.teacher_reused == 0
    assert len(calls) == 7 + 1  # every step, and the first step's LM-head check
    assert again.kl_last == report.kl_last
    for (name, expected), actual in zip(uncached.named_parameters(), cached.parameters()):
        assert torch.equal(actual, expected), name


def test_recovery_loss_top_k_needs_plain_lm_head(tiny_llama, calibrations):
    from moyu_cli.errors import MoyuError
    from moyu_cli.recover import recover

    teacher, student = _sparse_copies(tiny_llama, calibrations["llama"][1], 1)
    forward = teacher.forward

    def scaled(*args, **kwargs):
        """Logits scaled after the LM head, as some architectures do."""
        output = forward(*args, **kwargs)
        output.logits = output.logits * 0.5
        return output

    teacher.forward = scaled
    with pytest.raises(MoyuError, match=r"LlamaForCausalLM's logits differ from its LM head .*; remove loss_top_k"):
        recover(student, teacher, torch.randint(3, 100, (1, 32)), 1e-3, "float32", loss_top_k=4)


def test_recovery_loss_positions_needs_logits_to_keep(tiny_llama, calibrations):
    from torch import nn

    from moyu_cli.errors import MoyuError
    from moyu_cli.recover import recover

    class FullLogits(nn.Module):
        """A causal LM that takes logits_to_keep and ignores it."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.model, self.config = inner.model, inner.config

        def forward(self, input_ids, logits_to_keep=0, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)

    teacher, student = _sparse_copies(tiny_llama, calibrations["llama"][1], 1)
    with pytest.raises(MoyuError, match=r"32 positions, not the 4 .*ignores logits_to_keep\); remove loss_positions"):
        recover(FullLogits(student), teacher, torch.randint(3, 100, (1, 32)), 1e-3, "float32", loss_positions=4)


@pytest.mark.parametrize("name", sorted(p.stem for p in shipped_recipes_dir().glob("*.yaml")))
def test_shipped_recipe_runs_on_cpu_kernel(name, tiny_llama, calibrations, tmp_path):
    """Every shipped recipe converts, and its export decodes the same with the CPU kernel as with the reference."""
    recipe = load_recipe(name)
    small = {"search": recipe.search.model_copy(update={"tokens": 128, "step": 0.25})}
    if recipe.recovery is not None:
        small["recovery"] = recipe.recovery.model_copy(update={"tokens": 256})
    if recipe.sequential is not None:
        small["sequential"] = recipe.sequential.model_copy(update={"tokens": 256})
    out = tmp_path / name
    convert(tiny_llama, calibrations["llama"][1], recipe.model_copy(update=small), out, eval_windows=0)
    reference = moyu_cli.load(out, backend="torch")
    kernel = moyu_cli.load(out, backend="cpu")
    assert kernel.moyu_backend == "cpu"
    ids = torch.tensor([[5, 17, 3, 42, 8, 9]])
    tokens = [LeanDecoder(model, 16).generate(ids, 8) for model in (reference, kernel)]
    # Ties across a threshold can part the two greedy outputs late; the first tokens must agree.
    assert tokens[0][:4] == tokens[1][:4]


def test_hidden_loss_is_relative_per_position():
    from moyu_cli.recover import _hidden_loss

    teacher = tuple(torch.randn(1, 5, 8) for _ in range(3))
    assert float(_hidden_loss(teacher, teacher, 0)) == 0.0
    # Every layer's states doubled: a relative squared error of 1 at every position.
    doubled = (teacher[0],) + tuple(2 * t for t in teacher[1:])
    torch.testing.assert_close(_hidden_loss(doubled, teacher, 0), torch.tensor(1.0))
    # The embedding output is the same in both models and is left out. So are skipped positions.
    moved = (teacher[0] + 5,) + tuple(torch.cat([t[:, :1] * 9, t[:, 1:]], dim=1) for t in teacher[1:])
    assert float(_hidden_loss(moved, teacher, 1)) == 0.0


def test_recovery_ramp_reaches_plan(tiny_llama, calibrations, tmp_path, monkeypatch):
    import moyu_cli.recover
    from moyu_cli.calibrate import load_calibration
    from moyu_cli.sparsify import histogram_quantile

    seen = []
    train = moyu_cli.recover.recover

    def watched(student, *args, schedule=None, **kwargs):
        def step(index):
            schedule(index)
            seen.append(float(student.get_submodule("model.layers.0.self_attn.q_proj").threshold[0]))

        return train(student, *args, schedule=step, **kwargs)

    monkeypatch.setattr(moyu_cli.recover, "recover", watched)
    recipe = load_recipe("teal-uniform").with_sparsity(0.6)
    settings = RecoverySettings(tokens=128 * 16, lr=3e-3, dtype="float32", ramp=0.5, ramp_from=0.5, hidden_weight=1.0)
    config = convert(tiny_llama, calibrations["llama"][1], recipe.model_copy(update={"recovery": settings}), tmp_path / "out", eval_windows=0)
    histogram = load_calibration(calibrations["llama"][1]).statistics_for("model.layers.0.self_attn.q_proj").histogram
    assert len(seen) == 16
    # Stage k of 8 over the first 8 steps: sparsity (0.5 + 0.5 * k / 8) * 0.6; then the plan's threshold.
    for step in range(8):
        assert seen[step] == pytest.approx(histogram_quantile(histogram, (0.5 + 0.5 * step / 8) * 0.6), rel=1e-6)
    plan_threshold = config["modules"]["model.layers.0.self_attn.q_proj"]["threshold_mean"]
    assert seen[8:] == [pytest.approx(plan_threshold, rel=1e-6)] * 8
    assert seen == sorted(seen)


def test_recovery_holds_sparsity(tiny_llama, calibrations, tmp_path, monkeypatch):
    """`hold_sparsity` scales each threshold by exp(0.5 * (target - last step's skipped fraction)) and exports the result."""
    import math

    import moyu_cli.recover

    name = "model.layers.1.self_attn.q_proj"
    seen = []  # per step: (threshold used, fraction skipped on that step)
    train = moyu_cli.recover.recover

    def watched(student, *args, schedule=None, **kwargs):
        module = student.get_submodule(name)

        def step(index):
            if index:
                seen[-1] = (seen[-1][0], 1 - module.kept / module.total)
            schedule(index)
            seen.append((float(module.threshold[0]), None))

        return train(student, *args, schedule=step, **kwargs)

    monkeypatch.setattr(moyu_cli.recover, "recover", watched)
    recipe = load_recipe("teal-uniform").with_sparsity(0.6)
    settings = RecoverySettings(tokens=128 * 24, lr=3e-3, dtype="float32", hold_sparsity=True)
    out = tmp_path / "out"
    config = convert(tiny_llama, calibrations["llama"][1], recipe.model_copy(update={"recovery": settings}), out, eval_windows=0)
    assert len(seen) == 24
    for (before, skipped), (after, _) in zip(seen, seen[1:]):
        assert after == pytest.approx(before * math.exp(0.5 * (0.6 - skipped)), rel=1e-6)
    assert len({threshold for threshold, _ in seen}) > 1
    # The exported threshold is the one the last step trained with; q/k/v still share one.
    with safe_open(out / "moyu_thresholds.safetensors", "pt") as handle:
        q, k, v = (handle.get_tensor(f"model.layers.1.self_attn.{p}_proj.threshold") for p in "qkv")
    assert float(q[0]) == pytest.approx(seen[-1][0], rel=1e-6)
    assert torch.equal(q, k)
    assert torch.equal(q, v)
    # Reported: what each module skipped on the last training window, on average at the target.
    last_skipped = [entry["calibrated_sparsity"] for entry in config["modules"].values()]
    assert sum(last_skipped) / len(last_skipped) == pytest.approx(0.6, abs=0.02)
    assert all(abs(s - 0.6) < 0.1 for s in last_skipped), last_skipped


def test_recovery_ramp_and_hold_exclusive():
    with pytest.raises(ValueError, match="hold_sparsity"):
        RecoverySettings(ramp=0.5, hold_sparsity=True)


@pytest.mark.parametrize("failing_rename", [1, 2], ids=["old-moved-away", "new-moved-in"])
def test_atomic_directory_interrupted_keeps_old(tmp_path, monkeypatch, failing_rename):
    """Ctrl-C at either rename of a replacement leaves the previous output in place and no temporaries."""
    import os

    from moyu_cli.checkpoint import atomic_directory

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    replace, calls = os.replace, []

    def interrupted_replace(source, target):
        calls.append(1)
        if len(calls) == failing_rename:
            raise KeyboardInterrupt
        return replace(source, target)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out) as staging:
            (staging / "new.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert [path.name for path in out.iterdir()] == ["old.txt"]
    # Uninterrupted, the new output replaces the old one, and the old one is gone.
    with atomic_directory(out) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert [path.name for path in out.iterdir()] == ["new.txt"]
