"""The recipe files and README written beside merged weights, so a model says how it was made."""

from __future__ import annotations

from pathlib import Path

import yaml

from evomerge.recipe.mergekit import to_mergekit
from evomerge.recipe.recipe import Recipe

RECIPE_NAME = "evomerge_recipe.yaml"
MERGEKIT_NAME = "mergekit_config.yml"


def write_recipe_files(*, folder: Path, recipe: Recipe, scores: dict[str, float] | None = None) -> None:
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
    if scores:
        lines += ["## Scores that chose it", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value:.4f} |" for name, value in scores.items()]
        lines.append("")
    lines += ["## Recipe (evomerge)", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    lines += ["## The same merge for mergekit", "", "```yaml", mergekit_yaml.rstrip(), "```", ""]
    (folder / "README.md").write_text("\n".join(lines))
