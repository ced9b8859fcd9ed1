"""Write a Twin model as a Hugging Face folder: weights, factors, router, its modeling code and a card."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.io.atomic import atomic_folder
from evomerge.materialize.model_card import RECIPE_NAME, remote_code_loading
from evomerge.recipe.recipe import Recipe

MODELING_NAME = "modeling_twin.py"
_MODELING_SOURCE = Path(__file__).with_name("twin_modeling.py")


@dataclass(frozen=True)
class TwinSummary:
    """What the model card states about the exclusive parts and the router."""

    kept_bytes: int
    experts_bytes: int
    rank: int | None
    energy: float | None
    router_tasks: list[str]
    router_accuracy: float  # on its own training items: agreement with the lowest-loss expert


def write_twin(
    model: torch.nn.Module, tokenizer, recipe: Recipe, summary: TwinSummary, out_dir: Path, *, overwrite: bool = False
) -> Path:
    """Save ``model`` to ``out_dir`` so that ``AutoModelForCausalLM`` loads it with ``trust_remote_code=True``."""
    module = Path(MODELING_NAME).stem
    model.config.auto_map = {
        "AutoConfig": f"{module}.{model.config_class.__name__}",
        "AutoModelForCausalLM": f"{module}.{type(model).__name__}",
    }
    model.config.architectures = [type(model).__name__]
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(_MODELING_SOURCE, tmp / MODELING_NAME)
        (tmp / RECIPE_NAME).write_text(recipe.to_yaml())
        (tmp / "README.md").write_text(_model_card(recipe, summary))
    return out_dir


def _model_card(recipe: Recipe, summary: TwinSummary) -> str:
    size = f"rank {summary.rank}" if summary.rank is not None else f"{summary.energy:.0%} of each matrix's energy"
    share = summary.kept_bytes / summary.experts_bytes
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags: [merge, evomerge, twin-merging]",
            "---",
            "# Twin-Merging model",
            "",
            "Made by evomerge (Twin-Merging, Lu et al. 2024, arXiv:2406.15479): the merge below is the shared model;",
            f"each expert's difference from it is kept per weight matrix as a truncated SVD ({size}), and a router",
            "reads the shared model's pooled hidden state of each input and weights the experts' parts for it.",
            "",
            *[f"- expert {i}: `{path}`" for i, path in enumerate(recipe.model_paths)],
            "",
            f"Exclusive parts: {summary.kept_bytes:,} bytes, {share:.1%} of the experts' full size "
            f"({summary.experts_bytes:,} bytes).",
            f"Router: trained on {', '.join(summary.router_tasks)}, each item labelled by the expert with the lowest "
            f"loss on it; it picks that expert on {summary.router_accuracy:.1%} of those items.",
            "",
            *remote_code_loading(
                MODELING_NAME,
                "The weights change with each input",
                "loading fails rather than running the shared model alone. The experts' parts run as low-rank "
                "adapters beside the shared weights, batched over rows; a row's weights are read once from its "
                "prompt (one extra forward of the shared model) and hold while it generates, through the KV cache",
            ),
            "## Shared model recipe (evomerge)",
            "",
            "```yaml",
            recipe.to_yaml().rstrip(),
            "```",
            "",
        ]
    )
