"""Recipes: settings worked by hand, YAML round-trips in both formats, and validation errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.materialize.plan import depth, method_kwargs, validate
from evomerge.recipe.canonical import canonical_key
from evomerge.recipe.mergekit import from_mergekit, to_mergekit
from evomerge.recipe.recipe import Recipe, load_recipe
from evomerge.recipe.setting import Setting

RECIPE_YAML = """
method: ties
base: models/base
models:
  - model: models/math
    weight: 0.6
    density: {self_attn: 0.4, mlp: [0.2, 0.8], default: 0.5}
  - model: models/lang
    weight: [0.0, 1.0]
    density: 0.5
parameters: {lambda: 1.0, normalize: true}
dtype: float32
seed: 3
"""


def test_gradient_interpolates_like_mergekit():
    # [0, 1, 4] over 5 layers: t = i/4 -> scaled = t*2 = 0, .5, 1, 1.5, 2 -> 0, .5, 1, 2.5, 4
    setting = Setting.gradient([0.0, 1.0, 4.0])
    values = [setting.at(f"model.layers.{i}.mlp.up_proj.weight", depth(f"model.layers.{i}.x", 5)) for i in range(5)]
    assert values == pytest.approx([0.0, 0.5, 1.0, 2.5, 4.0])
    # outside the decoder layers mergekit uses t = 0: the first value
    assert setting.at("model.embed_tokens.weight", depth("model.embed_tokens.weight", 5)) == 0.0
    assert depth("model.layers.0.x", 1) == 1.0


def test_filters_first_match_wins_default_last():
    setting = Setting.from_plain({"default": 0.2, "self_attn": 0.3, "mlp": [0.1, 0.5]}, where="x")
    assert setting.at("model.layers.0.self_attn.q_proj.weight", 0.0) == 0.3
    assert setting.at("model.layers.3.mlp.down_proj.weight", 0.5) == pytest.approx(0.3)  # 0.1 + 0.5*(0.4)
    assert setting.at("model.norm.weight", 0.0) == 0.2
    mergekit_form = Setting.from_plain([{"filter": "mlp", "value": 0.9}, {"value": 0.1}], where="x")
    assert mergekit_form.at("a.mlp.b", 0) == 0.9 and mergekit_form.at("a.attn.b", 0) == 0.1


def test_recipe_round_trips_through_yaml(tmp_path):
    recipe = Recipe.from_plain(yaml.safe_load(RECIPE_YAML))
    again = Recipe.from_plain(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe
    assert again.canonical() == recipe.canonical()
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe


def test_mergekit_round_trip_keeps_meaning():
    recipe = Recipe.from_plain(yaml.safe_load(RECIPE_YAML))
    mk = to_mergekit(recipe)
    assert mk["merge_method"] == "ties" and mk["base_model"] == "models/base"
    assert mk["models"][0]["parameters"]["density"] == [
        {"filter": "self_attn", "value": 0.4},
        {"filter": "mlp", "value": [0.2, 0.8]},
        {"value": 0.5},
    ]
    back = from_mergekit(mk)
    assert back.models == recipe.models and back.parameters == recipe.parameters and back.base == recipe.base


def test_mergekit_base_listed_among_models_is_dropped():
    data = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [{"model": "b"}, {"model": "m", "parameters": {"weight": 1.0, "density": 0.5}}],
    }
    assert from_mergekit(data).model_paths == ["m"]


def test_per_model_values_resolve_per_tensor():
    recipe = Recipe.from_plain(yaml.safe_load(RECIPE_YAML))
    method = validate(recipe)
    import torch

    kw = method_kwargs(
        recipe,
        method,
        "model.layers.2.mlp.up_proj.weight",
        num_layers=3,
        device=torch.device("cpu"),
    )
    # layer 2 of 3: t = 1 -> math density = 0.8 (mlp gradient end), lang weight = 1.0 (gradient end)
    assert kw["density"].dtype == torch.float64  # exact densities: mergekit keeps int(density * n)
    assert kw["density"].tolist() == pytest.approx([0.8, 0.5])
    assert kw["weight"].tolist() == pytest.approx([0.6, 1.0])
    assert kw["lambda_"] == 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "nope"}, "unknown merge method 'nope'"),
        ({"models": [{"model": "m", "weight": 1.0, "density": 1.5}]}, "'density' = 1.5 is out of range"),
        ({"models": [{"model": "m", "weight": 1.0, "density": 0.0}]}, "'density' = 0.0 is out of range"),
        ({"models": [{"model": "m", "density": 0.5}]}, "needs 'weight' for every model"),
        ({"models": [{"model": "m", "weight": 1.0, "lambda": 2.0}]}, "applies to the whole merge"),
        ({"models": [{"model": "m", "weight": 1.0, "bogus": 2.0}]}, "has no parameter 'bogus'"),
        ({"base": None}, "needs a base model"),
        ({"dtype": "int8"}, "dtype 'int8' is not supported"),
    ],
)
def test_bad_recipes_name_the_problem(change, message):
    data = yaml.safe_load(RECIPE_YAML)
    data.update(change)
    with pytest.raises(EvomergeError, match=message):
        validate(Recipe.from_plain(data))


def test_mergekit_knobs_the_method_ignores_are_dropped_with_a_warning():
    data = {
        "merge_method": "task_arithmetic",
        "base_model": "b",
        "models": [{"model": "m", "parameters": {"weight": 0.5, "density": 0.3}}],
        "parameters": {"int8_mask": True},
    }
    with pytest.warns(UserWarning, match="'density' has no effect"):
        recipe = from_mergekit(data)
    assert set(recipe.models[0].parameters) == {"weight"} and recipe.parameters == {}


def test_negative_weights_need_asking_for_and_mergekit_configs_ask():
    data = yaml.safe_load(RECIPE_YAML)
    data["models"][0]["weight"] = -0.5
    with pytest.raises(EvomergeError, match="subtracts its task vector"):
        validate(Recipe.from_plain(data))
    validate(Recipe.from_plain({**data, "allow_negative_weights": True}))
    negated = from_mergekit(to_mergekit(Recipe.from_plain({**data, "allow_negative_weights": True})))
    assert negated.allow_negative_weights
    validate(negated)


def test_the_canonical_key_is_sorted_json_and_refuses_what_is_not_plain_data():
    plain = {"models": [{"weight": {"mlp": [0.1, 1e-05], "default": -0.0}, "model": "a: b"}], "method": "ties"}
    key = canonical_key(plain)
    assert key == '{"method": "ties", "models": [{"model": "a: b", "weight": {"default": -0.0, "mlp": [0.1, 1e-05]}}]}'
    assert json.loads(key) == plain  # floats read back exactly
    assert canonical_key(dict(reversed(list(plain.items())))) == key
    with pytest.raises(TypeError):  # a value that is not plain data is refused, not misspelled
        canonical_key({"w": np.float32(0.5)})
