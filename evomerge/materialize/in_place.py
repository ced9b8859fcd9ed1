"""The search's hot path: write a candidate's merged weights into a loaded model, in place, on its device.

Where the sources are kept is the worker's memory tier (``executor/memory.py`` picks the fastest that fits):
- ``resident``: on the model's device, in the form the method reads (task vectors computed once, here, not
  per candidate), with what a method declares it derives from its inputs alone (its ``precompute``: TIES'
  sorted magnitudes, slerp's norms, DARE's draws for the recipe's seed) where that fits too;
- ``host``: in host memory (one buffer, pinned on a GPU machine: host_buffer.py), copied to the device a tensor at a time per
  candidate, the next tensor's copy running on a side stream while this one merges;
- ``disk``: read from the checkpoints (the page cache, once warm) a tensor at a time per candidate.
Outside ``resident``, and where the precompute does not fit, the method runs its eager path, which merges
the same tensors (tests/test_memory_tiers.py). Each candidate costs one method call per tensor, written
straight into the parameter, with temporaries the size of one tensor, never a second model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from evomerge.errors import EvomergeError
from evomerge.materialize.host_buffer import HostBuffer
from evomerge.materialize.plan import method_kwargs, validate
from evomerge.materialize.sources import MergeSources
from evomerge.methods import MergeMethod, fused
from evomerge.recipe.recipe import Recipe

TIERS = ("resident", "host", "disk")


class InPlaceMerger:
    """Holds one recipe family's sources in ``tier`` and overwrites ``model`` per candidate on its device;
    ``precompute`` false: methods run their eager path (the resident tier's precompute did not fit)."""

    def __init__(
        self, *, model: torch.nn.Module, template: Recipe, tier: str = "resident", precompute: bool = True
    ) -> None:
        if tier not in TIERS:
            raise ValueError(f"unknown memory tier {tier!r}; one of {TIERS}")
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
        self.tier, self._precompute = tier, precompute and tier == "resident"
        self._sources, self._method = sources, method
        # The host tier's sources, all in one buffer (materialize/host_buffer.py says why one).
        self._host: HostBuffer | None = None
        with torch.no_grad():
            if tier == "resident":
                for name, target in self._targets.items():
                    # Each tensor merges on the device that holds its parameter (a model placed across
                    # several GPUs: executor.gpus_per_worker), so its resident inputs live there too.
                    self._resident[name] = sources.inputs(method, name, device=target.device, dtype=self.dtype)
            elif tier == "host":
                self._host = HostBuffer({name: sources.input_shapes(name) for name in self._targets}, dtype=self.dtype)
                for name in self._targets:
                    base, stacked = self._host.views(name)
                    read_base, read_stacked = sources.inputs(method, name, device=torch.device("cpu"), dtype=self.dtype)
                    stacked.copy_(read_stacked)
                    if base is not None:
                        base.copy_(read_base)
                    self._resident[name] = (base, stacked)
                if any(target.device.type == "cuda" for target in self._targets.values()):
                    self._host.pin()

    def materialize(self, recipe: Recipe) -> None:
        """Overwrite the model's weights with ``recipe``'s merge of the resident sources."""
        method = self._check(recipe)
        with torch.no_grad():
            for name, (base, stacked) in self._inputs():
                target = self._targets[name]
                kwargs = method_kwargs(recipe, method, name, num_layers=self.num_layers, device=target.device)
                if method.precompute is not None and self._precompute:
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
        # Only now, the first candidate merged eagerly: compiling beside it would slow it down (methods/fused.py).
        fused.start_building()

    def _inputs(self) -> Iterator[tuple[str, tuple[torch.Tensor | None, torch.Tensor]]]:
        """Each tensor's ``(base, stacked)`` on its parameter's device, from the tier that keeps them."""
        if self.tier == "resident":
            yield from self._resident.items()
        elif self.tier == "disk":
            for name, target in self._targets.items():
                yield name, self._sources.inputs(self._method, name, device=target.device, dtype=self.dtype)
        elif all(target.device.type != "cuda" for target in self._targets.values()):
            yield from self._resident.items()  # host memory is the device's memory: nothing to copy
        else:
            yield from _streamed(self._resident, {name: target.device for name, target in self._targets.items()})

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


def _streamed(
    kept: dict[str, tuple[torch.Tensor | None, torch.Tensor]], devices: dict[str, torch.device], cuda=torch.cuda
) -> Iterator[tuple[str, tuple[torch.Tensor | None, torch.Tensor]]]:
    """Host tensors copied to their GPU one tensor ahead of the merge: tensor k+1 is copied on a side
    stream of its device while tensor k merges on the compute stream, and each copy is freed once its
    merge has run. ``cuda``: the module whose streams are used (a test passes a recording fake)."""
    sides: dict[torch.device, torch.cuda.Stream] = {}

    def copy(name: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        device = devices[name]
        side = sides.setdefault(device, cuda.Stream(device))
        # Taken before entering the side stream, inside which it would be the side stream itself: the copy
        # waits for the merges queued so far, so memory they free and the allocator hands to the copy is
        # not written while they still read it.
        compute = cuda.current_stream(device)
        side.wait_stream(compute)
        with cuda.stream(side):
            return tuple(None if t is None else t.to(device, non_blocking=True) for t in kept[name])

    names = list(kept)
    ahead = copy(names[0]) if names else None
    for index, name in enumerate(names):
        compute = cuda.current_stream(devices[name])
        compute.wait_stream(sides[devices[name]])  # the merge reads the copy once it has landed
        pair = ahead
        for tensor in pair:
            if tensor is not None and tensor.is_cuda:
                tensor.record_stream(compute)  # freed after the merge that reads it, not after the copy
        ahead = copy(names[index + 1]) if index + 1 < len(names) else None
        yield name, pair


def untie_head(model: torch.nn.Module) -> None:
    """Give a model loaded with tied embeddings a head of its own, as the merge of tied and untied sources
    has (``MergeSources.open``); the config says so, or transformers would tie them again (``tie_weights``)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embedding.weight:
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone())
    model.config.tie_word_embeddings = False


def _source_key(recipe: Recipe) -> tuple[str | None, tuple[str, ...], str | None]:
    return recipe.base if validate(recipe).takes_base else None, tuple(recipe.model_paths), recipe.tokenizer_source
