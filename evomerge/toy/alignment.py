"""Do the models read L2 the way they read L1? The check every toy world must pass before any merge is
scored (TOYWORLD.md: four designs failed because the two languages never shared representations)."""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evomerge.toy.language import TWINS, random_text, translate


@torch.no_grad()
def alignment_figures(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sentences: int = 64
) -> dict[str, float | list[float]]:
    """Embedding and hidden-state similarity of L2 to L1, each next to its unrelated-pair reference.

    - ``twin_cosine``: mean cosine of each L2 input embedding with its L1 twin's;
      ``unrelated_cosine``: mean cosine between different L1 words' embeddings.
    - ``twin_nearest``: fraction of L2 words whose nearest L1 embedding is their twin.
    - ``hidden_parallel``: per layer (embeddings first), mean cosine of the mean-pooled hidden state of
      an L1 sentence and its L2 translation; ``hidden_unrelated``: the same for two different L1 sentences.
    """
    weight = model.get_input_embeddings().weight
    l1 = torch.nn.functional.normalize(weight[[tokenizer.convert_tokens_to_ids(w) for w, _ in TWINS]], dim=1)
    l2 = torch.nn.functional.normalize(weight[[tokenizer.convert_tokens_to_ids(w) for _, w in TWINS]], dim=1)
    count = len(TWINS)
    l1_pairs = l1 @ l1.T
    rng = random.Random(0)
    texts = [random_text(rng) for _ in range(sentences)]
    l1_states = _pooled_states(model, tokenizer, texts)
    l2_states = _pooled_states(model, tokenizer, [translate(text) for text in texts])
    return {
        "twin_cosine": (l1 * l2).sum(1).mean().item(),
        "unrelated_cosine": ((l1_pairs.sum() - count) / (count * count - count)).item(),
        "twin_nearest": ((l2 @ l1.T).argmax(1) == torch.arange(count)).float().mean().item(),
        "hidden_parallel": [(a * b).sum(1).mean().item() for a, b in zip(l1_states, l2_states, strict=True)],
        "hidden_unrelated": [(a * a.roll(1, 0)).sum(1).mean().item() for a in l1_states],
    }


def _pooled_states(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[torch.Tensor]:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    states = model(**batch, output_hidden_states=True).hidden_states
    mask = batch.attention_mask.unsqueeze(-1).float()
    return [torch.nn.functional.normalize((state * mask).sum(1) / mask.sum(1), dim=1) for state in states]
