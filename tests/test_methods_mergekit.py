"""Tensor-level parity with mergekit 0.1.5: the same random tensors through mergekit's own
``merge_tensors`` (in mergekit's interpreter) and through our registry, compared entry by entry.

mergekit lives in its own environment; point ``EVOMERGE_MERGEKIT_PYTHON`` at its interpreter (``make
test`` does). Random methods are compared too: mergekit draws from torch's global generator, ours from
a generator seeded the same way, and both draw the same masks in the same order. They are compared with
``rescale: false``: there mergekit scales survivors by an L1-norm ratio where we divide each by its keep
probability (see ``evomerge.methods.sparsify``; tests/test_methods.py checks that division), so only
the masks, which are what the seed decides, can agree entry for entry.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from evomerge.methods import get_method

TOLERANCE = 1e-5
# In bf16 the two implementations round different intermediates (mergekit rounds weights, products and
# partial sums to bf16 in places where we accumulate in float32 inside one kernel, and our linear rounds
# its float32 coefficients to bf16 once), so they can differ by an ulp. The bf16 check is therefore: our
# bf16 merge is no further from mergekit's float32 merge of the same inputs than mergekit's own bf16
# merge is, give or take one bf16 rounding (relative, as bf16 resolution scales with magnitude).
BF16_SLACK = 2**-8

_CANDIDATES = (
    os.environ.get("EVOMERGE_MERGEKIT_PYTHON"),
    str(Path(__file__).resolve().parents[1] / ".venv-mergekit" / "bin" / "python"),
    "/work/mkvenv/bin/python",
)

_RUN_MERGEKIT = """
import sys, torch
from mergekit.merge_methods import merge_tensors
cases = torch.load(sys.argv[1])
outputs = []
for case in cases:
    if case["seed"] is not None:
        torch.manual_seed(case["seed"])
    outputs.append(
        merge_tensors(
            case["tensors"], case["method"], parameters=case["parameters"], base_index=case["base_index"]
        )
    )
torch.save(outputs, sys.argv[2])
"""


def _mergekit_python() -> str | None:
    for candidate in _CANDIDATES:
        if not candidate or not Path(candidate).exists():
            continue
        probe = subprocess.run([candidate, "-c", "import mergekit.merge_methods"], capture_output=True)
        if probe.returncode == 0:
            return candidate
    return None


MERGEKIT_PYTHON = _mergekit_python()
pytestmark = pytest.mark.skipif(
    MERGEKIT_PYTHON is None,
    reason="no Python with mergekit importable: set EVOMERGE_MERGEKIT_PYTHON (see `make test`)",
)


def _case(name, method, shape, models, parameters, *, dtype=torch.float32, seed=None, tensor_seed=0, base=None):
    """A merge of ``models`` random non-base tensors (plus a base where the method needs one, or where
    ``base`` says so for a method that takes one or none)."""
    generator = torch.Generator().manual_seed(tensor_seed)
    origin = torch.randn(shape, generator=generator)
    # Fine-tuned models sit near the base, as in practice (keeps slerp away from its colinear branch).
    others = [origin + 0.5 * torch.randn(shape, generator=generator) for _ in range(models)]
    has_base = get_method(method).needs_base if base is None else base
    tensors = ([origin] if has_base else []) + others
    return {
        "id": name,
        "method": method,
        "tensors": [t.to(dtype) for t in tensors],
        "base_index": 0 if has_base else None,
        "parameters": parameters,
        "seed": seed,
    }


def _cases() -> list[dict]:
    w3 = [0.6, -0.3, 0.9]
    cases = [
        _case("linear-normalize", "linear", (16, 24), 3, {"weight": [0.2, 0.5, 1.1], "normalize": True}),
        _case("linear-raw-neg-zero", "linear", (37,), 3, {"weight": [1.0, -0.5, 0.0], "normalize": False}),
        _case("linear-1model", "linear", (5, 7), 1, {"weight": [0.7], "normalize": True}),
        _case("slerp-0.3", "slerp", (16, 24), 1, {"t": 0.3}),
        _case("slerp-0", "slerp", (16, 24), 1, {"t": 0.0}),
        _case("slerp-1", "slerp", (37,), 1, {"t": 1.0}),
        _case("task_arithmetic", "task_arithmetic", (16, 24), 3, {"weight": w3}),
        _case(
            "task_arithmetic-norm-lambda",
            "task_arithmetic",
            (16, 24),
            3,
            {"weight": w3, "normalize": True, "lambda": 0.7},
        ),
        _case(
            "task_arithmetic-cancelling",
            "task_arithmetic",
            (37,),
            2,
            {"weight": [0.5, -0.5], "normalize": True},
        ),
        _case("ties-defaults", "ties", (16, 24), 3, {"weight": w3}),
        _case("ties-trim", "ties", (16, 24), 3, {"weight": w3, "density": [0.3, 0.5, 0.8]}),
        _case(
            "ties-trim-rescale-lambda",
            "ties",
            (37,),
            3,
            {"weight": [1.0, 0.5, 0.25], "density": 0.4, "rescale": True, "lambda": 1.3, "int8_mask": True},
        ),
        _case(
            "ties-no-normalize",
            "ties",
            (8, 8, 3),
            2,
            {"weight": [0.7, 0.4], "density": 0.5, "normalize": False},
        ),
        _case(
            "breadcrumbs",
            "breadcrumbs",
            (16, 24),
            3,
            {"weight": w3, "density": [0.6, 0.7, 0.8], "gamma": [0.05, 0.1, 0.0]},
        ),
        _case(
            "breadcrumbs-gamma-exceeds",
            "breadcrumbs",
            (37,),
            2,
            {"weight": [1.0, 1.0], "density": 0.9, "gamma": 0.3, "rescale": True},
        ),
        _case(
            "breadcrumbs_ties",
            "breadcrumbs_ties",
            (16, 24),
            3,
            {"weight": w3, "density": 0.5, "gamma": 0.02, "normalize": True},
        ),
        _case("model_stock", "model_stock", (16, 24), 3, {}),
        _case("model_stock-2", "model_stock", (37,), 2, {}),
        _case("model_stock-filter", "model_stock", (16, 24), 3, {"filter_wise": True}),
        _case("model_stock-filter-1d", "model_stock", (37,), 2, {"filter_wise": True}),
        _case(
            "dare_linear",
            "dare_linear",
            (16, 24),
            3,
            {"weight": w3, "density": [0.3, 0.6, 0.9], "rescale": False},
            seed=7,
        ),
        _case(
            "dare_linear-1d",
            "dare_linear",
            (37,),
            2,
            {"weight": [0.5, 0.5], "density": 0.5, "rescale": False},
            seed=8,
        ),
        # A million entries per model: a keep probability off by a few in 2**24 (rounded to a multiple of
        # 2**-16, say: 0.3 and 0.7 by 51 and 205) would keep about 15 entries mergekit drops.
        _case(
            "dare_linear-million",
            "dare_linear",
            (1000, 1000),
            2,
            {"weight": [0.5, 0.5], "density": [0.3, 0.7], "rescale": False},
            seed=13,
        ),
        _case(
            "dare_ties",
            "dare_ties",
            (16, 24),
            3,
            {"weight": w3, "density": [0.5, 1.0, 0.2], "normalize": True, "rescale": False},
            seed=9,
        ),
        _case(
            "della",
            "della",
            (16, 24),
            3,
            {"weight": w3, "density": [0.5, 0.4, 0.6], "epsilon": [0.1, 0.2, 0.05], "rescale": False},
            seed=10,
        ),
        _case(
            "della-1d",
            "della",
            (37,),
            2,
            {"weight": [1.0, 0.5], "density": 0.5, "epsilon": 0.15, "lambda": 0.8, "rescale": False},
            seed=11,
        ),
        _case(
            "della_linear",
            "della_linear",
            (16, 24),
            2,
            {"weight": [0.8, 0.6], "density": 0.7, "epsilon": 0.1, "rescale": False},
            seed=12,
        ),
        _case("sce-defaults", "sce", (16, 24), 3, {}),
        _case("sce-topk", "sce", (16, 24), 3, {"select_topk": 0.3}),
        _case("sce-topk-1d-int8", "sce", (37,), 2, {"select_topk": 0.5, "int8_mask": True}),
        _case("sce-topk-zero", "sce", (8, 8, 3), 2, {"select_topk": 0.0}),
        # One model: its variance is 0 everywhere, so a select_topk under 1 keeps nothing.
        _case("sce-1model", "sce", (5, 7), 1, {"select_topk": 0.5}),
        _case("nuslerp-base", "nuslerp", (16, 24), 2, {"weight": [0.3, 0.7]}, base=True),
        _case("nuslerp-rows", "nuslerp", (16, 24), 2, {"weight": [1.0, 2.0], "nuslerp_flatten": False}, base=True),
        _case(
            "nuslerp-columns",
            "nuslerp",
            (16, 24),
            2,
            {"weight": [0.5, 0.5], "nuslerp_flatten": False, "nuslerp_row_wise": True},
            base=False,
        ),
        _case("nuslerp-1d", "nuslerp", (37,), 2, {"weight": [0.4, 0.6]}, base=False),
        _case("nuslerp-cancelling", "nuslerp", (16, 24), 2, {"weight": [0.5, -0.5]}, base=False),
        _case("multislerp-base", "multislerp", (16, 24), 3, {"weight": [0.2, 0.5, 0.3]}, base=True),
        _case(
            "multislerp-raw",
            "multislerp",
            (16, 24),
            3,
            {"weight": [1.0, 2.0, 3.0], "normalize_weights": False},
            base=False,
        ),
        _case("multislerp-eps", "multislerp", (37,), 2, {"weight": [0.6, 0.4], "eps": 1e-3}, base=True),
        _case("multislerp-1model", "multislerp", (5, 7), 1, {"weight": [0.7]}, base=True),
        _case("karcher", "karcher", (16, 24), 3, {}),
        _case("karcher-2-few-steps", "karcher", (37,), 2, {"max_iter": 3, "tol": 1e-6}),
        _case("karcher-no-steps", "karcher", (8, 8, 3), 3, {"max_iter": 0}),
        _case("nearswap", "nearswap", (16, 24), 1, {"t": 0.3}),
        _case("nearswap-small-t", "nearswap", (37,), 1, {"t": 1e-4}),
        _case("arcee_fusion", "arcee_fusion", (16, 24), 1, {}),
        _case("arcee_fusion-1d", "arcee_fusion", (37,), 1, {}),
        # Over a million entries mergekit estimates the quartiles from a sample drawn from torch's global
        # generator: seeded with 0, it draws the sample ours draws.
        _case("arcee_fusion-sampled", "arcee_fusion", (1100, 1000), 1, {}, seed=0),
    ]
    # mergekit's arcee_fusion multiplies by a float32 mask, so its bf16 merge comes back in float32 (its
    # model writer rounds it to the output dtype): the float32 cases compare it.
    bf16 = [
        _case(
            f"{c['id']}-bf16",
            c["method"],
            c["tensors"][0].shape,
            len(c["tensors"]) - (c["base_index"] == 0),
            c["parameters"],
            base=c["base_index"] == 0,
        )
        for c in cases
        if c["seed"] is None and c["method"] not in ("linear", "arcee_fusion")
    ]
    bf16 += [_case("linear-bf16", "linear", (16, 24), 3, {"weight": [0.2, 0.5, 1.1], "normalize": True})]
    for case in bf16:
        case["tensors"] = [t.to(torch.bfloat16) for t in case["tensors"]]
    return cases + bf16


CASES = _cases()
# mergekit's float32 merge of each bf16 case's (exactly upcast) inputs: the reference both bf16 results
# are measured against.
TWINS = {
    index: dict(case, tensors=[t.float() for t in case["tensors"]])
    for index, case in enumerate(CASES)
    if case["tensors"][0].dtype == torch.bfloat16
}


@pytest.fixture(scope="module")
def mergekit_outputs(tmp_path_factory: pytest.TempPathFactory) -> list:
    folder = tmp_path_factory.mktemp("mergekit")
    inputs, outputs = folder / "cases.pt", folder / "outputs.pt"
    batch = CASES + list(TWINS.values())
    torch.save([{k: v for k, v in case.items() if k != "id"} for case in batch], inputs)
    run = subprocess.run(
        [MERGEKIT_PYTHON, "-c", _RUN_MERGEKIT, str(inputs), str(outputs)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    results = torch.load(outputs)
    twin_results = dict(zip(TWINS, results[len(CASES) :], strict=True))
    return [(result, twin_results.get(index)) for index, result in enumerate(results[: len(CASES)])]


def ours(case: dict) -> torch.Tensor:
    """Our method on the case's tensors, with mergekit's parameter names mapped onto the registry."""
    method = get_method(case["method"])
    tensors = case["tensors"]
    has_base = case["base_index"] == 0
    base = tensors[0] if has_base else None
    stacked = torch.stack(tensors[1:] if has_base else tensors)
    models = stacked.shape[0]
    kwargs = {}
    for param in method.params:
        value = case["parameters"].get(param.name, param.default)
        if param.per_model:
            values = value if isinstance(value, list) else [value] * models
            # float64 so a density like 0.7 keeps the value mergekit's Python float has.
            kwargs[param.arg] = torch.tensor(values, dtype=torch.float64)
        else:
            kwargs[param.arg] = value
    if method.random:
        kwargs["generator"] = torch.Generator().manual_seed(case["seed"])
    inputs = stacked - base if method.inputs == "deltas" else stacked
    return method.merge(base, inputs, **kwargs)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case["id"] for case in CASES])
def test_matches_mergekit(index: int, mergekit_outputs: list) -> None:
    case = CASES[index]
    expected, float32_reference = mergekit_outputs[index]
    got = ours(case)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if float32_reference is None:
        error = (got - expected).abs().max().item()
        assert error <= TOLERANCE, f"{case['id']}: max abs diff {error:.3g}"
        return

    def error(merged: torch.Tensor) -> float:
        scale = float32_reference.abs().clamp(min=1)
        return ((merged.float() - float32_reference).abs() / scale).max().item()

    assert error(got) <= error(expected) + BF16_SLACK, f"{case['id']}: {error(got):.3g} vs {error(expected):.3g}"
