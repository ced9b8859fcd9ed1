"""Write a data-flow recipe as a Hugging Face model folder that ``AutoModelForCausalLM`` loads.

Path position k becomes decoder layer k: the tensors of the source layer it runs are copied under
``model.layers.{k}.`` (a layer used twice is written twice), embeddings, final norm and LM head come
from the embedding source (a tied source has no LM head tensor and stays tied), and the config is that
source's with the new layer count and each per-layer list (``layer_types``) following its layers. Where
every scale is 1 that is a standard model (and a mergekit passthrough config of the same stack is
written beside it). Otherwise the folder ships `dataflow_modeling.py`, which applies the scales, and
needs ``trust_remote_code=True`` (see that file for why the scales cannot be folded into the weights).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from evomerge.dtypes import torch_dtype
from evomerge.io.atomic import atomic_folder, refuse_existing
from evomerge.io.checkpoint import layer_index
from evomerge.io.writer import ShardedWriter, write_model_files
from evomerge.materialize.dataflow import open_sources, per_layer_values, source_configs
from evomerge.materialize.model_card import RECIPE_NAME, card_tail, remote_code_loading
from evomerge.recipe.dataflow import DataFlowRecipe, to_passthrough

MERGEKIT_NAME = "mergekit_config.yml"
MODELING_NAME = "modeling_dataflow.py"
_MODELING_SOURCE = Path(__file__).with_name("dataflow_modeling.py")


def write_dataflow_model(
    recipe: DataFlowRecipe,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    scores: dict[str, float] | None = None,
) -> Path:
    """Write the model ``recipe`` describes to ``out_dir``; nothing appears there unless all of it is written."""
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite=overwrite)
    checkpoints = open_sources(recipe.sources)
    recipe.check([checkpoint.num_layers for checkpoint in checkpoints])
    ends = checkpoints[recipe.embedding_source]
    config = dict(ends.config)
    config["num_hidden_layers"] = len(recipe.path)
    config.update(per_layer_values(source_configs(recipe.sources), recipe.path))
    if not recipe.unit_scales:
        config.update(_scaled_model_config(config["model_type"]), input_scales=[step.scale for step in recipe.path])
    first = ends.names[0]
    dtype = torch_dtype(recipe.dtype) if recipe.dtype else ends.dtype(first)
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        writer = ShardedWriter(folder=tmp, max_shard_bytes=max_shard_bytes)
        for name in ends.names:
            if layer_index(name) is None:
                writer.add(name, ends.load(name, dtype=dtype))
        for position, step in enumerate(recipe.path):
            source = checkpoints[step.source]
            prefix = f"model.layers.{step.layer}."
            for name in source.names:
                if name.startswith(prefix):
                    # A copy: safetensors refuses two names on one storage, and a reused layer reads the same one.
                    tensor = source.load(name, dtype=dtype).clone()
                    writer.add(f"model.layers.{position}.{name[len(prefix) :]}", tensor)
        writer.finish()
        write_model_files(folder=tmp, config=config, dtype=dtype, source=ends.path, tokenizer_source=ends.path)
        if recipe.unit_scales:
            passthrough = yaml.safe_dump(to_passthrough(recipe), sort_keys=False, default_flow_style=None)
            (tmp / MERGEKIT_NAME).write_text(passthrough)
        else:
            passthrough = None
            shutil.copyfile(_MODELING_SOURCE, tmp / MODELING_NAME)
        (tmp / RECIPE_NAME).write_text(recipe.to_yaml())
        (tmp / "README.md").write_text(_model_card(recipe, scores, passthrough))
    return out_dir


def _scaled_model_config(model_type: str) -> dict:
    """The config keys that make ``AutoModelForCausalLM`` load the family's scaled model from MODELING_NAME."""
    from evomerge.materialize.dataflow_modeling import SCALED_MODELS  # every family in FAMILIES has one

    model = SCALED_MODELS[model_type]
    module = Path(MODELING_NAME).stem
    return {
        "model_type": model.config_class.model_type,
        "architectures": [model.__name__],
        "auto_map": {
            "AutoConfig": f"{module}.{model.config_class.__name__}",
            "AutoModelForCausalLM": f"{module}.{model.__name__}",
        },
    }


def _model_card(recipe: DataFlowRecipe, scores: dict[str, float] | None, passthrough: str | None) -> str:
    lines = ["---", "library_name: transformers", "tags: [merge, evomerge, data-flow-merge]", "---"]
    lines += ["# Data-flow merged model", ""]
    lines += [
        f"Made by evomerge: a path of {len(recipe.path)} decoder layers through these models "
        "(data-flow-space merging, Akiba et al. 2024, arXiv:2403.13187); embeddings, final norm and LM head "
        f"come from `{recipe.sources[recipe.embedding_source]}`.",
        "",
        *[f"- source {i}: `{path}`" for i, path in enumerate(recipe.sources)],
        "",
        "| layer | source | source layer | input scale |",
        "| --- | --- | --- | --- |",
        *[f"| {k} | {s.source} | {s.layer} | {s.scale:.4f} |" for k, s in enumerate(recipe.path)],
        "",
    ]
    if passthrough is None:
        lines += remote_code_loading(
            MODELING_NAME,
            "The path scales each decoder layer's input (the hidden state), which the standard model cannot",
            "loading fails rather than ignoring the scales",
        )
    mergekit = None if passthrough is None else ("## The same stack for mergekit (passthrough)", passthrough)
    lines += card_tail(scores, recipe.to_yaml(), mergekit)
    return "\n".join(lines)
