"""The search's hot path: write a candidate's merged weights into a loaded model, in place, on its device.

Sources stay resident on the model's device in the form the method reads (task vectors are computed
once, here, not per candidate), and so does what a method declares it derives from its inputs alone
(its ``precompute``: TIES' sorted magnitudes, slerp's norms, DARE's draws for the recipe's seed),
computed the first time a candidate uses that method (and seed). Each candidate costs one method call
per tensor, written straight into the parameter, with temporaries the size of one tensor, never a
second model.
"""

from __future__ import annotations

import torch

from evomerge.errors import EvomergeError
from evomerge.materialize.plan import method_kwargs, validate
from evomerge.materialize.sources import MergeSources
from evomerge.methods import MergeMethod
from evomerge.recipe.recipe import Recipe


class InPlaceMerger:
    """Holds one recipe family's sources on ``model``'s device and overwrites ``model`` per candidate."""

    def __init__(self, *, model: torch.nn.Module, template: Recipe) -> None:
        method = validate(template)
        sources = MergeSources.open(template, method)
        if sources.vocabulary is not None:
            # The model was loaded from the reference checkpoint, in its vocabulary; every row is
            # overwritten per candidate, so new rows need no initialization of their own.
            model.resize_token_embeddings(sources.vocabulary.size, mean_resizing=False)
        if sources.tied:
            untie_head(model)
        parameters = dict(model.named_parameters())
        missing = [name for name in sources.reference.names if name not in parameters]
        if missing:
            raise EvomergeError(
                f"the loaded model has no parameter '{missing[0]}' that the checkpoints hold",
                "load the model from the base checkpoint of the recipe (same architecture and tensor names)",
            )
        first = parameters[sources.reference.names[0]]
        self.model = model
        # The output vocabulary's tokenizer where the recipe sets tokenizer_source, else None (the reference's).
        self.tokenizer = sources.vocabulary.tokenizer if sources.vocabulary is not None else None
        self.device, self.dtype = first.device, first.dtype
        self.inputs = method.inputs
        self.num_layers = sources.reference.num_layers
        self._key = _source_key(template)
        self._targets = {name: parameters[name] for name in sources.reference.names}
        self._resident: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
        # (precompute function, seed for a random method) -> tensor name -> its result; a search changes
        # parameters, rarely methods or seeds. Only the latest seed's draws are kept (see _precomputed_for).
        self._precomputed: dict[tuple[object, int | None], dict[str, object]] = {}
        with torch.no_grad():
            for name in self._targets:
                self._resident[name] = sources.inputs(method, name, device=self.device, dtype=self.dtype)

    def materialize(self, recipe: Recipe) -> None:
        """Overwrite the model's weights with ``recipe``'s merge of the resident sources."""
        method = self._check(recipe)
        with torch.no_grad():
            for name, target in self._targets.items():
                base, stacked = self._resident[name]
                kwargs = method_kwargs(recipe, method, name, num_layers=self.num_layers, device=self.device)
                if method.precompute is not None:
                    known = self._precomputed_for(method, recipe)
                    if name not in known:
                        # A random precompute takes this tensor's generator, as the method would draw.
                        extra = {"generator": kwargs["generator"]} if method.random else {}
                        known[name] = method.precompute(base, stacked, **extra)
                    kwargs["precomputed"] = known[name]
                # Methods write into a flat view of ``out`` in the sources' dtype.
                if target.is_contiguous() and target.dtype == self.dtype:
                    method.merge(base, stacked, **kwargs, out=target)
                else:
                    target.copy_(method.merge(base, stacked, **kwargs))

    def _precomputed_for(self, method: MergeMethod, recipe: Recipe) -> dict[str, object]:
        """The results of ``method.precompute`` kept for ``recipe``; a random method's are the draws of
        one seed, as large as the sources: a new seed replaces them instead of adding to them."""
        key = (method.precompute, recipe.seed if method.random else None)
        if key not in self._precomputed and method.random:
            for stale in [k for k in self._precomputed if k[0] is method.precompute]:
                del self._precomputed[stale]
        return self._precomputed.setdefault(key, {})

    def _check(self, recipe: Recipe) -> MergeMethod:
        method = validate(recipe)
        if _source_key(recipe) != self._key or method.inputs != self.inputs:
            raise EvomergeError(
                "the candidate recipe merges other models (or needs other inputs) than the resident sources",
                "build a new InPlaceMerger for that set of models and that family of methods",
            )
        return method


def untie_head(model: torch.nn.Module) -> None:
    """Give a model loaded with tied embeddings a head of its own, as the merge of tied and untied sources
    has (``MergeSources.open``); the config says so, or transformers would tie them again (``tie_weights``)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embedding.weight:
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone())
    model.config.tie_word_embeddings = False


def _source_key(recipe: Recipe) -> tuple[str | None, tuple[str, ...], str | None]:
    return recipe.base if validate(recipe).takes_base else None, tuple(recipe.model_paths), recipe.tokenizer_source
