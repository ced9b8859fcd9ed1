"""Twin at real size (issue 30): the batched low-rank forward, the KV cache and the randomized SVD give
what the implementation before them gave: each row alone, routed alone, its routed tensors rebuilt dense
from exact (float64, full) SVD factors. That implementation is restated here as the reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate.lm_eval_scorer import LMEvalScorer, TaskSet
from evomerge.io.checkpoint import Checkpoint
from evomerge.recipe.recipe import ModelEntry, Recipe
from evomerge.toy.tokenizer import build_tokenizer
from evomerge.twin.build import twin_from_shared
from evomerge.twin.exclusive import exclusive_parts
from evomerge.twin.export import TwinSummary, write_twin
from evomerge.twin.items import task_items
from evomerge.twin.model import assemble_twin
from evomerge.twin.twin_modeling import TwinRouter, factor_key
from tests.test_architectures import World, build

TASKS = ["toy_math", "toy_lang"]


def dense_logits(twin, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The Twin forward before issue 30: every row on its own real tokens, its weights routed on them alone,
    every routed tensor rebuilt dense (shared + sum_i w_i U_i V_i, norms shared + sum_i w_i D_i), then the
    family's plain forward; padding positions get zeros."""
    own = dict(twin.named_parameters())
    parts = twin.twin_factors
    logits = torch.zeros(*ids.shape, twin.config.vocab_size)
    for row in range(len(ids)):
        real = mask[row].bool()
        alone = ids[row, real].unsqueeze(0)
        weights = twin.route(alone)[0].tolist()
        tensors = {}
        for name, ranks in twin.config.twin_ranks.items():
            us = parts[factor_key(name, "u")].split(ranks, dim=1)
            vs = parts[factor_key(name, "v")].split(ranks, dim=0)
            tensors[name] = own[name] + sum(w * (u @ v) for w, u, v in zip(weights, us, vs, strict=True))
        for name in twin.config.twin_vector_shapes:
            tensors[name] = own[name] + sum(w * d for w, d in zip(weights, parts[factor_key(name, "d")], strict=True))
        decoder = {name.removeprefix("model."): t for name, t in tensors.items() if name.startswith("model.")}
        hidden = functional_call(twin.model, decoder, args=(), kwargs={"input_ids": alone}).last_hidden_state
        head = tensors.get("lm_head.weight", twin.lm_head.weight)
        if twin.config.tie_word_embeddings:
            head = tensors.get("model.embed_tokens.weight", head)
        logits[row, real] = torch.nn.functional.linear(hidden, head)[0]
    return logits


def exact_factors(shared, experts, rank: int) -> dict:
    """Each matrix's rank-``rank`` truncation from a full float64 SVD, as the build made it before issue 30."""
    factors = {}
    for name in shared.names:
        if len(shared.shape(name)) == 2:
            factors[name] = []
            for expert in experts:
                delta = expert.load(name).float() - shared.load(name).float()
                u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
                factors[name].append(((u[:, :rank] * s[:rank]).float(), vh[:rank].float()))
    return factors


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    root = tmp_path_factory.mktemp("twin-families")
    return {family: routed_twin(build(family, root / family)) for family in ("llama_tied", "qwen2", "qwen3", "mistral")}


def routed_twin(world, rank: int = 3):
    shared = Checkpoint.open(world.base)
    factors, vectors = exclusive_parts(shared, [Checkpoint.open(e) for e in world.experts], rank=rank)
    twin = assemble_twin(world.base, factors, vectors, num_experts=2, router_size=8)
    # A random router, its output scaled so that rows get weights from about 0.55 to 0.9 on one expert.
    torch.manual_seed(0)
    router = TwinRouter(hidden_size=twin.config.hidden_size, router_size=8, num_experts=2)
    with torch.no_grad():
        router.outer.weight.mul_(3)
    twin.twin_router.load_state_dict(router.state_dict())
    return twin


def padded(rows: list[list[int]], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    pad = [[0] * (width - len(r)) for r in rows]
    ids = [p + r if left else r + p for r, p in zip(rows, pad, strict=True)]
    mask = [
        [0] * len(p) + [1] * len(r) if left else [1] * len(r) + [0] * len(p) for r, p in zip(rows, pad, strict=True)
    ]
    return torch.tensor(ids), torch.tensor(mask)


PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 40, 41, 42], [1, 90, 3, 17, 4]]


# Llama with tied embeddings (the head routed by the embedding's factors), Qwen2 (routed q/k/v biases),
# Qwen3 (q/k norms, routed on 4-D inputs), Mistral (sliding window).
@pytest.mark.parametrize("family", ["llama_tied", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_the_batched_low_rank_forward_gives_the_dense_rebuild_of_each_row(twins, family, left):
    twin = twins[family]
    ids, mask = padded(PROMPTS, left=left)
    with torch.no_grad():
        weights = twin.route(ids, mask)
        batched = twin(input_ids=ids, attention_mask=mask).logits
        reference = dense_logits(twin, ids, mask)
    assert weights.min() > 0.1 and weights[:, 0].max() - weights[:, 0].min() > 0.03  # mixed, and per row
    real = mask.bool()
    torch.testing.assert_close(batched[real], reference[real], atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama_tied", "qwen2", "qwen3"])
def test_generation_through_the_kv_cache_gives_the_tokens_and_scores_without_it(twins, family):
    twin = twins[family]
    ids, mask = padded(PROMPTS, left=True)
    runs = {
        use_cache: twin.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            use_cache=use_cache,
            output_scores=True,
            return_dict_in_generate=True,
        )
        for use_cache in (True, False)
    }
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    torch.testing.assert_close(torch.stack(runs[True].scores), torch.stack(runs[False].scores), atol=2e-5, rtol=0)
    # The routing weights are the prompt's, held while generating: each row makes the tokens it makes alone.
    for row, prompt in enumerate(PROMPTS):
        alone = twin.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
        assert torch.equal(runs[True].sequences[row, -6:], alone[0, -6:])
    # A decode loop of one's own: the cache carries the prompt's weights to the next token's forward.
    prompt = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        first = twin(input_ids=prompt, use_cache=True)
        step = twin(input_ids=torch.tensor([[11]]), cache=first.cache).logits[0, -1]
        whole = twin.forward_routed(torch.tensor([[*PROMPTS[0], 11]]), None, twin.route(prompt)).logits[0, -1]
    torch.testing.assert_close(step, whole, atol=2e-5, rtol=0)


def test_on_the_toy_world_logits_and_scores_are_those_of_the_exact_svd_and_dense_rebuild(toy_world):
    every = task_items(TASKS, include_path=str(toy_world.tasks_dir))
    items = [item for task in TASKS for item in [i for i in every if i.task == task][:12]]
    refs = [str(toy_world.experts["math"]), str(toy_world.experts["lang"])]
    twin, _ = twin_from_shared(toy_world.base, refs, items, svd_rank=4)
    before = copy.deepcopy(twin)
    exact = exact_factors(Checkpoint.open(toy_world.base), [Checkpoint.open(ref) for ref in refs], rank=4)
    with torch.no_grad():
        for name, pairs in exact.items():
            before.twin_factors[factor_key(name, "u")].copy_(torch.cat([u for u, _ in pairs], dim=1))
            before.twin_factors[factor_key(name, "v")].copy_(torch.cat([v for _, v in pairs], dim=0))
    # The randomized SVD's rank-4 product is the exact one's, to float32 rounding of these weights.
    for name, pairs in exact.items():
        low = twin.twin_factors[factor_key(name, "u")][:, :4] @ twin.twin_factors[factor_key(name, "v")][:4]
        torch.testing.assert_close(low, pairs[0][0] @ pairs[0][1], atol=1e-5, rtol=0)
    before.forward = lambda input_ids, attention_mask=None, **kwargs: _Logits(
        dense_logits(before, input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask)
    )
    ids, mask = padded([[2, 14, 15, 16, 17, 18], [2, 30, 31]], left=False)
    with torch.no_grad():
        torch.testing.assert_close(
            twin(input_ids=ids, attention_mask=mask).logits[mask.bool()],
            before(input_ids=ids, attention_mask=mask).logits[mask.bool()],
            atol=1e-4,
            rtol=0,
        )
    tasks = TaskSet(names=tuple(TASKS), include_path=str(toy_world.tasks_dir), limit=16, batch_size=4)
    tokenizer = AutoTokenizer.from_pretrained(toy_world.base)
    scored = [LMEvalScorer(model=model, tokenizer=tokenizer, tasks=tasks).score() for model in (twin, before)]
    assert scored[0] == scored[1] and {"toy_math/acc", "toy_lang/acc"} <= set(scored[0])


class _Logits:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


def test_a_bfloat16_model_keeps_its_factors_in_float32_through_export_and_reload(tmp_path):
    world = build("qwen2", tmp_path / "float32")
    for name, path in [("base", world.base), *[(f"expert{i}", e) for i, e in enumerate(world.experts)]]:
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(tmp_path / name)
    twin = routed_twin(
        World(family="qwen2", base=tmp_path / "base", experts=(tmp_path / "expert0", tmp_path / "expert1"))
    )
    assert twin.model.embed_tokens.weight.dtype == torch.bfloat16
    recipe = Recipe(method="linear", models=(ModelEntry(model=str(tmp_path / "base")),))
    summary = TwinSummary(kept_bytes=0, experts_bytes=1, rank=3, energy=None, router_tasks=["x"], router_accuracy=1.0)
    out = write_twin(twin, build_tokenizer(), recipe, summary, tmp_path / "twin")
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert {p.dtype for p in reloaded.twin_factors.parameters()} == {torch.float32}
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    ids, mask = padded(PROMPTS, left=False)
    with torch.no_grad():
        assert torch.equal(
            twin(input_ids=ids, attention_mask=mask).logits, reloaded(input_ids=ids, attention_mask=mask).logits
        )
