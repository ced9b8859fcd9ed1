"""The recipe files and README written beside merged weights, so a model says how it was made."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from evomerge.methods import get_method
from evomerge.recipe.mergekit import to_mergekit
from evomerge.recipe.recipe import Recipe

RECIPE_NAME = "evomerge_recipe.yaml"
MERGEKIT_NAME = "mergekit_config.yml"
# The mergekit section of a random method's card: its heading and why the config is not this model
# (card_tail adds the YAML). Per-tensor seeds: materialize/plan.py; mergekit's: MergeOptions.random_seed.
RANDOM_MERGEKIT_SECTION = """## The same method for mergekit (not the same model)

mergekit draws this method's random masks from one global generator (`--random-seed` seeds it once for the
whole merge), where evomerge seeds each tensor's generator from the recipe's `seed` and the tensor's name:
this config merges with the same method and parameters but other masks, so it gives another model. With
`rescale` on (the default), mergekit also scales the survivors to the task vector's L1 norm where evomerge
divides each by its keep probability. To rebuild this model, merge `evomerge_recipe.yaml` with evomerge on
the same kind of device (the masks come from that device's generator)."""


def write_recipe_files(
    *, folder: Path, recipe: Recipe, scores: dict[str, float] | None = None, tied: Sequence[str] = ()
) -> None:
    """The recipe, its mergekit config and the card; ``tied``: sources saved with tied embeddings that
    were merged with untied ones (``MergeSources.tied``)."""
    recipe_yaml = recipe.to_yaml()
    mergekit_yaml = yaml.safe_dump(to_mergekit(recipe), sort_keys=False, default_flow_style=None)
    (folder / RECIPE_NAME).write_text(recipe_yaml)
    (folder / MERGEKIT_NAME).write_text(mergekit_yaml)
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, evomerge]",
        "---",
        "# Merged model",
        "",
        f"Made by evomerge with the `{recipe.method}` method from these models:",
        "",
        *[f"- `{path}`" for path in ([recipe.base] if recipe.base else []) + recipe.model_paths],
        "",
    ]
    if tied:
        lines += [untied_note(tied), ""]
    heading = RANDOM_MERGEKIT_SECTION if get_method(recipe.method).random else "## The same merge for mergekit"
    lines += card_tail(scores, recipe_yaml, (heading, mergekit_yaml))
    (folder / "README.md").write_text("\n".join(lines))


def untied_note(tied: Sequence[str]) -> str:
    return (
        "Its embeddings are untied (`tie_word_embeddings: false`, its own `lm_head.weight`): "
        + ", ".join(f"`{ref}`" for ref in tied)
        + " tied them and the other sources did not, so its LM head merges those sources' input embeddings "
        "(what transformers uses as their head) with the others' heads. mergekit writes the same tensors from "
        "the config below but keeps the base model's `tie_word_embeddings`: where that is true, set it to false "
        "in mergekit's config.json (transformers 4 ties them again on loading, the head becoming the embedding)."
    )


def remote_code_loading(modeling_file: str, why: str, without: str) -> list[str]:
    """A model card's "Loading" section for a folder that ships its own modeling code: ``why`` the standard
    model cannot run it, and what loading ``without`` ``trust_remote_code=True`` does instead."""
    return [
        "## Loading",
        "",
        f"{why}, so this folder ships its own modeling code (`{modeling_file}`). Read it first (it is short),",
        "then load with:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(FOLDER, trust_remote_code=True)  # it reads config.json too",
        "```",
        "",
        f"lm-eval: `--model_args pretrained=FOLDER,trust_remote_code=True`. Without `trust_remote_code=True` {without}.",
        "",
    ]


def card_tail(scores: dict[str, float] | None, recipe_yaml: str, mergekit: tuple[str, str] | None) -> list[str]:
    """A model card's closing sections: the scores that chose the model, its evomerge recipe, and
    (``mergekit`` = heading, YAML) the same model for mergekit where it can express it."""
    lines = []
    if scores:
        lines += ["## Scores that chose it", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value:.4f} |" for name, value in scores.items()]
        lines.append("")
    lines += ["## Recipe (evomerge)", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    if mergekit is not None:
        heading, mergekit_yaml = mergekit
        lines += [heading, "", "```yaml", mergekit_yaml.rstrip(), "```", ""]
    return lines
