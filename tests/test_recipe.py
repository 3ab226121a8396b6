"""Recipe validation: every shipped recipe loads, round-trips, and bad files fail naming key and file.

CPU only, no model: `pytest tests/test_recipe.py`.
"""

from pathlib import Path

import pytest
import yaml

from moyu_cli.errors import RecipeError
from moyu_cli.recipe import load_recipe, parse_recipe, shipped_recipes_dir

SHIPPED = sorted(shipped_recipes_dir().glob("*.yaml"))

GOOD = {
    "version": 1,
    "name": "t",
    "sparsity": 0.5,
    "modifiers": [{"type": "magnitude", "targets": ["q_proj"]}],
}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_recipes_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"teal-uniform", "cats-mlp"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert 0 < recipe.sparsity < 1


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_round_trips(path):
    recipe = load_recipe(path)
    assert parse_recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe


def test_recipe_by_shipped_name():
    assert load_recipe("teal-uniform").name == "teal-uniform"


def test_sparsity_override():
    recipe = load_recipe("teal-uniform").with_sparsity(0.4)
    assert recipe.sparsity == 0.4
    with pytest.raises(RecipeError, match="outside"):
        recipe.with_sparsity(1.0)


@pytest.mark.parametrize(
    "change, key, message",
    [
        ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
        ({"sparsity": "half"}, "sparsity", "valid number"),
        ({"sparsity": 1.5}, "sparsity", "less than 1"),
        ({"sparsity": -0.1}, "sparsity", "greater than or equal to 0"),
        ({"prefill": "sometimes"}, "prefill", "'sparse' or 'dense'"),
        ({"modifiers": []}, "modifiers", "at least 1 item"),
        ({"modifiers": [{"type": "magic"}]}, "modifiers.0", "does not match any of the expected tags"),
        ({"modifiers": [{"type": "magnitude", "targetz": ["q_proj"]}]}, "modifiers.0.magnitude.targetz", "Extra inputs"),
        ({"modifiers": [{"type": "magnitude", "targets": "q_proj"}]}, "modifiers.0.magnitude.targets", "valid list"),
        ({"recovery": {"loss_positions": 0}}, "recovery.loss_positions", "greater than or equal to 1"),
        ({"recovery": {"loss_top_k": 0}}, "recovery.loss_top_k", "greater than or equal to 1"),
    ],
)
def test_bad_recipe_names_key_and_file(tmp_path, change, key, message):
    path = write(tmp_path, GOOD | change)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert str(path) in text
    assert f"key '{key}'" in text
    assert message in text


def test_rewire_with_sequence_mlp(tmp_path):
    recipe = {"version": 1, "name": "x", "sparsity": 0.5, "rewire": {}, "modifiers": [{"type": "sequence_mlp", "selection": "threshold"}]}
    with pytest.raises(RecipeError, match="'rewire' orders the neurons of thresholded MLPs, and a 'sequence_mlp' modifier gathers its own; remove 'rewire'"):
        load_recipe(write(tmp_path, recipe))


def test_prompt_tokens_with_top_k(tmp_path):
    recipe = {"version": 1, "name": "x", "sparsity": 0.5, "modifiers": [{"type": "sequence_mlp", "prompt_tokens": 128}]}
    with pytest.raises(RecipeError, match="'prompt_tokens' sets the calibration prompts of 'selection: threshold'"):
        load_recipe(write(tmp_path, recipe))


def test_missing_version(tmp_path):
    data = dict(GOOD)
    del data["version"]
    with pytest.raises(RecipeError, match="key 'version' is missing"):
        load_recipe(write(tmp_path, data))


def test_future_version(tmp_path):
    with pytest.raises(RecipeError, match="key 'version' is 2; this moyu reads version 1"):
        load_recipe(write(tmp_path, GOOD | {"version": 2}))


def test_repeated_modifier_type(tmp_path):
    data = GOOD | {"modifiers": [{"type": "magnitude"}, {"type": "magnitude"}]}
    with pytest.raises(RecipeError, match="repeat"):
        load_recipe(write(tmp_path, data))


def test_not_yaml(tmp_path):
    path = write(tmp_path, "version: 1\nmodifiers: [unclosed\n")
    with pytest.raises(RecipeError, match=r"not valid YAML at line"):
        load_recipe(path)


def test_not_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(write(tmp_path, "- 1\n- 2\n"))


def test_missing_file():
    with pytest.raises(RecipeError, match="recipe file not found: no-such.yaml; pass a YAML path or one of: .*teal-uniform"):
        load_recipe("no-such.yaml")
