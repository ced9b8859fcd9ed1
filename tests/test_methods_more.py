"""mergekit 0.1.5's later methods (sce, nuslerp, multislerp, karcher, nearswap, arcee_fusion): each formula
worked by hand, their knobs' ranges, their recipes through mergekit's YAML, and a toy search with sce."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM

from evomerge.errors import EvomergeError
from evomerge.materialize.plan import validate
from evomerge.recipe.mergekit import from_mergekit, to_mergekit
from evomerge.recipe.recipe import Recipe, load_recipe
from tests.test_methods import call

R = math.sqrt(0.5)
ONES = torch.ones(4)


# ---------------------------------------------------------------------------------------------------
# SCE


def test_sce_weights_models_by_mean_square_and_erases_disagreeing_entries() -> None:
    deltas = torch.tensor([[2.0, -1.0, 0.0, 3.0], [4.0, 1.0, -2.0, -1.0]])
    # Weights: mean squares 14/4 = 3.5 and 22/4 = 5.5, over their sum 9. Column sums [6, 0, -2, 2] elect
    # [+, +, -, +] (a zero sum elects +). Column 0: both agree, (2 * 3.5 + 4 * 5.5) / 9 = 29/9 (TIES'
    # plain mean would give 3); column 1: only d2's +1; column 2: d1's 0 has no sign, d2's -2; column 3: d1's 3.
    merged = call("sce", ONES, ONES + deltas)
    torch.testing.assert_close(merged, ONES + torch.tensor([29 / 9, 1.0, -2.0, 3.0]))


def test_sce_select_topk_keeps_the_entries_that_vary_most_across_models() -> None:
    deltas = torch.tensor([[2.0, -1.0, 0.0, 3.0], [4.0, 2.0, -2.0, -1.0]])
    # Population variances per column: 1, 2.25, 1, 4; all 4 nonzero, so 0.5 keeps int(4 * 0.5) = 2:
    # columns 3 and 1. What is left: d1 = [0, -1, 0, 3], d2 = [0, 2, 0, -1], mean squares 2.5 and 1.25
    # (weights 2/3, 1/3). Column 1 elects + (sum 1): d2's 2; column 3 elects +: d1's 3; the others are 0.
    merged = call("sce", ONES, ONES + deltas, select_topk=0.5)
    torch.testing.assert_close(merged, ONES + torch.tensor([0.0, 2.0, 0.0, 3.0]))
    # 0 keeps nothing: the base.
    assert torch.equal(call("sce", ONES, ONES + deltas, select_topk=0.0), ONES)


def test_sce_weighs_models_alike_when_their_mean_squares_are_tiny() -> None:
    # Mean squares 0.5e-8 and 4.5e-8 sum to under 1e-6: mergekit then weighs each model 1/2, so column 0
    # is (1e-4 + 3e-4) / 2 = 2e-4, not the mean-square weighted 0.1 * 1e-4 + 0.9 * 3e-4 = 2.8e-4.
    deltas = torch.tensor([[1e-4, 0.0], [3e-4, 0.0]], dtype=torch.float64)
    merged = call("sce", torch.zeros(2, dtype=torch.float64), deltas)
    torch.testing.assert_close(merged, torch.tensor([2e-4, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------
# NuSLERP


def test_nuslerp_interpolates_at_the_second_models_share_of_the_weights() -> None:
    models = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # Orthogonal: theta = pi/2, sin(theta) = 1. Weights [1, 1]: t = 1/2, both coefficients sin(pi/4).
    torch.testing.assert_close(call("nuslerp", None, models, weight=[1.0, 1.0]), torch.tensor([R, 2 * R]))
    # Weights [1, 3]: t = 3/4, coefficients sin(pi/8) = 0.3826834 and sin(3 pi/8) = 0.9238795.
    torch.testing.assert_close(
        call("nuslerp", None, models, weight=[1.0, 3.0]), torch.tensor([0.3826834, 2 * 0.9238795])
    )
    # Weights summing to 0: t = 1/2.
    torch.testing.assert_close(call("nuslerp", None, models, weight=[0.5, -0.5]), torch.tensor([R, 2 * R]))
    # Given a base, the task vectors are interpolated and added to it.
    torch.testing.assert_close(
        call("nuslerp", torch.ones(2), 1 + models, weight=[1.0, 1.0]), torch.tensor([1 + R, 1 + 2 * R])
    )


def test_nuslerp_rows_and_columns() -> None:
    models = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [2.0, 0.0]]])
    # One slerp per row: row 0 is orthogonal (sin(pi/4) each), row 1 colinear, hence linear: [1.5, 0].
    rows = call("nuslerp", None, models, weight=[1.0, 1.0], nuslerp_flatten=False)
    torch.testing.assert_close(rows, torch.tensor([[R, R], [1.5, 0.0]]))
    # One per column (row_wise, along dim 0): column 0 is [1, 1] vs [0, 2], cos = 1/sqrt(2), theta = pi/4,
    # each coefficient sin(pi/8) / sin(pi/4) = 0.5411961. Column 1 of the first model is zero: its unit
    # vector is 0, cos = 0, so theta = pi/2 and the second model's column enters times sin(pi/4).
    columns = call("nuslerp", None, models, weight=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    torch.testing.assert_close(columns, torch.tensor([[0.5411961, R], [3 * 0.5411961, 0.0]]))
    # flatten (the default) makes the whole tensor one vector and overrides row_wise: cos = 2 / sqrt(10).
    theta = math.acos(2 / math.sqrt(10))
    whole = (models[0] + models[1]) * math.sin(theta / 2) / math.sin(theta)
    torch.testing.assert_close(call("nuslerp", None, models, weight=[1.0, 1.0], nuslerp_row_wise=True), whole)


# ---------------------------------------------------------------------------------------------------
# Multi-SLERP


def test_multislerp_is_the_normalised_weighted_mean_direction_times_the_mean_norm() -> None:
    # Units [1, 0] and [0, 1], weights 3/4 and 1/4: their weighted mean [0.75, 0.25] has norm 0.7905694,
    # direction [0.9486833, 0.3162278]. The weighted tangent vectors there sum to zero (they always do:
    # sum w_i (u_i - (u_i.m) m) = M - (M.m) m = 0 for m = M/|M|), so the exponential map returns m,
    # scaled by the weighted mean norm 0.75 * 2 + 0.25 * 4 = 2.5.
    models = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    direction = torch.tensor([0.9486833, 0.3162278])
    torch.testing.assert_close(call("multislerp", None, models, weight=[0.75, 0.25]), 2.5 * direction)
    # Weights 1.5 and 0.5 unnormalised: the same direction, norm 1.5 * 2 + 0.5 * 4 = 5.
    torch.testing.assert_close(
        call("multislerp", None, models, weight=[1.5, 0.5], normalize_weights=False), 5 * direction
    )
    # Given a base, the task vectors are merged and added to it.
    torch.testing.assert_close(call("multislerp", torch.ones(2), 1 + models, weight=[0.75, 0.25]), 1 + 2.5 * direction)


def test_multislerp_antipodal_inputs() -> None:
    # Two: the weighted mean direction is 0, so mergekit interpolates linearly: 0.5 [1, 0] + 0.5 [-1, 0].
    merged = call("multislerp", None, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), weight=[1.0, 1.0])
    torch.testing.assert_close(merged, torch.zeros(2))
    # Three whose weights cancel have no direction at all: refused, as mergekit does.
    models = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    with pytest.raises(EvomergeError, match="weighted mean of the"):
        call("multislerp", None, models, weight=[2.0, 1.0, 1.0])


def test_multislerp_one_model_is_that_model() -> None:
    model = torch.tensor([[3.0, -1.0]])
    assert torch.equal(call("multislerp", torch.zeros(2), model, weight=[0.2]), model[0])


# ---------------------------------------------------------------------------------------------------
# Karcher mean


def test_karcher_mean_on_a_circle_is_the_mean_angle() -> None:
    # Directions at 0, 0 and 90 degrees. Their Euclidean mean [2/3, 1/3] points at atan(1/2) = 26.57
    # degrees (where max_iter = 0 stops); on the circle the Karcher mean minimises the squared arc
    # lengths, at the mean angle 30 degrees, reached in one step (log and exp are exact on a circle).
    models = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(call("karcher", None, models), torch.tensor([math.sqrt(3) / 2, 0.5]))
    torch.testing.assert_close(call("karcher", None, models, max_iter=0), torch.tensor([2, 1]) / math.sqrt(5))


def test_karcher_scales_by_the_mean_norm_and_zero_inputs_have_no_direction() -> None:
    # [2, 0] and [0, 4]: the midpoint direction [r, r] and the mean norm (2 + 4) / 2 = 3.
    torch.testing.assert_close(call("karcher", None, torch.tensor([[2.0, 0.0], [0.0, 4.0]])), torch.tensor([3 * R] * 2))
    # A zero input takes no part in the direction but counts in the scale: (2 + 0) / 2 = 1.
    torch.testing.assert_close(call("karcher", None, torch.tensor([[2.0, 0.0], [0.0, 0.0]])), torch.tensor([1.0, 0.0]))
    # All zero: zero.
    assert torch.equal(call("karcher", None, torch.zeros(2, 3)), torch.zeros(3))


# ---------------------------------------------------------------------------------------------------
# NearSwap


def test_nearswap_moves_each_entry_by_t_over_its_distance() -> None:
    # |base - model| = [0.5, 2, 0.1, 0]; t = 0.5 gives weights min(1, 0.5 / d) = [1, 0.25, 1, 1] (0 is
    # floored at 1e-6): near entries take the model's value, the far one moves a quarter of the way.
    model = ONES + torch.tensor([0.5, 2.0, -0.1, 0.0])
    torch.testing.assert_close(call("nearswap", ONES, model[None], t=0.5), torch.tensor([1.5, 1.5, 0.9, 1.0]))
    assert torch.equal(call("nearswap", ONES, model[None], t=0.0), ONES)


# ---------------------------------------------------------------------------------------------------
# Arcee Fusion


def test_arcee_fusion_takes_only_outlier_importance_entries() -> None:
    base = torch.zeros(2, 4)
    # Row 0 shifts every entry by 5: its softmax is unchanged, KL 0, so none of it matters. Row 1 has KL K
    # > 0 and importances K [0.1, 0.2, 0.4, 3]. Sorted, all 8: [0, 0, 0, 0, 0.1K, 0.2K, 0.4K, 3K]; quartiles
    # at int(q * 7) = 1, 3, 5: q1 = median = 0, q3 = 0.2K, threshold 0 + 1.5 * 0.2K = 0.3K: 0.4K and 3K pass.
    model = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.1, 0.2, 0.4, 3.0]])
    merged = call("arcee_fusion", base, model[None])
    torch.testing.assert_close(merged, torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.4, 3.0]]))


def test_arcee_fusion_estimates_quartiles_of_large_tensors_from_a_fixed_sample() -> None:
    """Over a million entries the quartiles come from a million drawn with replacement, with a fixed
    seed: the same inputs give the same merge (mergekit's global generator gives another per run)."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(1001, 1000, generator=generator)
    model = base + 0.1 * torch.randn(1001, 1000, generator=generator)
    first = call("arcee_fusion", base, model[None])
    torch.manual_seed(123)  # the global generator does not matter
    assert torch.equal(first, call("arcee_fusion", base, model[None]))
    taken = (first != base).float().mean().item()
    assert 0 < taken < 0.5  # outliers only


# ---------------------------------------------------------------------------------------------------
# Knob ranges, model counts, and recipes through mergekit's YAML.


def recipe(method: str, models: list[dict], parameters: dict | None = None, base: str | None = "b") -> Recipe:
    plain = {"method": method, "base": base, "models": models, "parameters": parameters or {}, "dtype": "float32"}
    return Recipe.from_plain(plain)


@pytest.mark.parametrize(
    ("method", "models", "parameters", "message"),
    [
        ("sce", [{"model": "m"}], {"select_topk": 1.5}, r"'select_topk' = 1.5 is out of range.*\[0.0, 1.0\]"),
        ("sce", [{"model": "m"}], {"select_topk": -0.1}, "'select_topk' = -0.1 is out of range"),
        ("nearswap", [{"model": "m"}], {"t": -0.001}, r"'t' = -0.001 is out of range.*\[0.0, inf\]"),
        ("nearswap", [{"model": "m"}], {}, "needs the parameter 't'"),
        ("karcher", [{"model": "m"}, {"model": "n"}], {"max_iter": 2.5}, "'max_iter' must be a whole number"),
        ("karcher", [{"model": "m"}, {"model": "n"}], {"max_iter": -1}, "'max_iter' = -1.0 is out of range"),
        ("karcher", [{"model": "m"}, {"model": "n"}], {"tol": -1e-5}, "'tol' = -1e-05 is out of range"),
        ("multislerp", [{"model": "m", "weight": 1.0}], {"eps": 0.0}, r"'eps' = 0.0 is out of range.*\(0.0, inf\]"),
        ("nuslerp", [{"model": "m", "weight": 1.0}], {}, "merges exactly 2 model"),
        ("nuslerp", [{"model": "m", "weight": 1.0}, {"model": "n"}], {}, "needs 'weight' for every model"),
        ("arcee_fusion", [{"model": "m"}, {"model": "n"}], {}, "merges exactly 1 model"),
        (
            "nuslerp",
            [{"model": "m", "weight": 1}, {"model": "n", "weight": 1}],
            {"nuslerp_flatten": 1},
            "true or false",
        ),
    ],
)
def test_out_of_range_knobs_are_refused_with_the_range(method, models, parameters, message) -> None:
    with pytest.raises(EvomergeError, match=message) as caught:
        validate(recipe(method, models, parameters))
    assert "\n" not in str(caught.value)


def test_optional_base_methods_round_trip_through_mergekit_with_and_without_a_base() -> None:
    weighted = [{"model": "m", "weight": 0.3}, {"model": "n", "weight": 0.7}]
    for method in ("nuslerp", "multislerp"):
        for base in ("b", None):
            ours = recipe(method, weighted, {"nuslerp_flatten": False} if method == "nuslerp" else {}, base=base)
            config = to_mergekit(ours)
            assert config.get("base_model") == base and [m["model"] for m in config["models"]] == ["m", "n"]
            assert from_mergekit(config) == ours
    # A base listed among mergekit's models is the base, not a third model.
    config = {
        "merge_method": "nuslerp",
        "base_model": "b",
        "models": [{"model": "b"}, *[{"model": e["model"], "parameters": {"weight": e["weight"]}} for e in weighted]],
    }
    back = from_mergekit(config)
    assert back.base == "b" and back.model_paths == ["m", "n"]


@pytest.mark.parametrize(
    ("method", "models", "parameters", "base"),
    [
        ("sce", [{"model": "m"}, {"model": "n"}], {"select_topk": [0.2, 0.8], "int8_mask": True}, "b"),
        ("karcher", [{"model": "m"}, {"model": "n"}, {"model": "o"}], {"max_iter": 20, "tol": 1e-6}, None),
        ("nearswap", [{"model": "m"}], {"t": {"mlp": 0.001, "default": 0.0001}}, "b"),
        ("arcee_fusion", [{"model": "m"}], {}, "b"),
    ],
)
def test_recipes_round_trip_through_mergekit(method, models, parameters, base) -> None:
    ours = recipe(method, models, parameters, base=base)
    validate(ours)
    assert from_mergekit(to_mergekit(ours)) == ours


# ---------------------------------------------------------------------------------------------------
# A toy search with SCE, exported and reloaded.


@pytest.mark.e2e
def test_toy_search_with_sce_runs_and_exports(toy_world, tmp_path) -> None:
    from evomerge.config import CONF_DIR, register_configs
    from evomerge.export import export_run
    from evomerge.search.session import start

    run_dir = tmp_path / "run"
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"run_dir={run_dir}",
                f"models.base={toy_world.base}",
                f"models.experts=[{toy_world.experts['math']},{toy_world.experts['lang']}]",
                f"tasks.include_path={toy_world.tasks_dir}",
                "tasks.names=[toy_math]",
                "tasks.limit=4",
                "objectives=[{name: math, terms: {toy_math/acc: 1.0}}]",
                "method=sce",
                # select_topk per layer: two coordinates (pycma 4.5 fails in one dimension with bounds).
                "genome.layer_groups=null",
                "optimizer.popsize=4",
                "budget.evaluations=4",
                "seed=3",
            ],
        )
    state = start(cfg, run_dir)
    assert state.evaluations == 4 and state.best is not None
    (out,) = export_run(run_dir, tmp_path / "best")
    assert load_recipe(out / "evomerge_recipe.yaml").method == "sce"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert model(torch.tensor([[1, 5, 6, 7, 8]])).logits.isfinite().all()
