"""Create and train the toy world's tiny Llama models."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.toy.spec import WorldSpec

Sampler = Callable[[random.Random], str]
# An extra training term computed on the model being trained, with the run's random stream.
ExtraLoss = Callable[[LlamaForCausalLM, random.Random], torch.Tensor]


def new_model(
    spec: WorldSpec,
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int,
    hidden_size: int | None = None,
    num_layers: int | None = None,
) -> LlamaForCausalLM:
    """A randomly initialised Llama; ``hidden_size``/``num_layers`` override the spec for the
    incompatible models."""
    hidden = hidden_size or spec.hidden_size
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=spec.intermediate_size * hidden // spec.hidden_size,
        num_hidden_layers=num_layers or spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=64,
        # Untied, so that merging lm_head is a separate decision from merging the input embeddings.
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def mixture(parts: Sequence[tuple[float, Sampler]]) -> Sampler:
    """A sampler drawing from each part with the given probability."""
    weights = [weight for weight, _ in parts]
    samplers = [sampler for _, sampler in parts]

    def sample(rng: random.Random) -> str:
        return rng.choices(samplers, weights=weights)[0](rng)

    return sample


def train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    sample: Sampler,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    only_rows: Sequence[int] | None = None,
    freeze_input_embeddings: bool = False,
    extra_loss: ExtraLoss | None = None,
) -> list[float]:
    """Next-token training on sampled sentences; returns the loss of every step.

    With ``only_rows``, everything is frozen except those rows of the input embedding and of lm_head:
    the way a model is taught a new vocabulary without touching what its layers compute. Weight decay is
    zero so that frozen rows stay bit-identical (AdamW's update is exactly 0 where every gradient was 0),
    which keeps such a task vector confined to its rows.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    if only_rows is not None:
        mask = torch.zeros(model.config.vocab_size, 1)
        mask[list(only_rows)] = 1.0
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        rows = (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
        for weight in rows:
            weight.requires_grad_(True)
            weight.register_hook(lambda grad: grad * mask)
    if freeze_input_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses = []
    for _ in range(steps):
        batch = tokenizer([sample(rng) for _ in range(batch_size)], padding=True, return_tensors="pt")
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        # Right padding under a causal mask cannot change the loss at real tokens, so no attention mask.
        loss = model(input_ids=batch.input_ids, labels=labels).loss
        if extra_loss is not None:
            loss = loss + extra_loss(model, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.eval()
    return losses
