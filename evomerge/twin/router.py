"""Train the router: a small MLP from the shared model's pooled hidden state to an expert label.

Labels: each item is labelled by the expert whose own model gives its target the lowest loss, and
the router is trained as a classifier on those labels. The paper labels items by their task, because
there every task has its own expert; an evomerge run's tasks do not map one to one onto experts (the
toy world's combined task needs both), so the label is read from the experts' losses instead. This
keeps the paper's cheap classification (features computed once by the frozen shared model, a tiny
MLP trained on CPU in seconds, reproducible from a seed) rather than training through the routed
model's loss, which would need a backward pass through the whole model for every step.
"""

from __future__ import annotations

import torch

from evomerge.twin.items import TaskItem
from evomerge.twin.twin_modeling import TwinRouter, pooled_hidden

ROUTER_SIZE = 64


def train_router(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_experts: int,
    router_size: int = ROUTER_SIZE,
    seed: int = 0,
    steps: int = 500,
    lr: float = 1e-2,
) -> TwinRouter:
    """A router fitted to ``labels`` (one expert index per row of ``features``), the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = TwinRouter(hidden_size=features.shape[1], router_size=router_size, num_experts=num_experts)
    optimizer = torch.optim.Adam(router.parameters(), lr=lr, weight_decay=1e-4)
    # One thread: a 64-wide MLP gains nothing from a thread pool, which on a busy machine costs
    # milliseconds per operation (measured: 25 s for 500 steps on a loaded 2-core VM, not 1 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            batch = torch.randint(0, len(features), (min(64, len(features)),), generator=generator)
            loss = torch.nn.functional.cross_entropy(router(features[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return router.eval()


def scored_inputs(tokenizer, items: list[TaskItem]) -> list[tuple[list[int], int]]:
    """Per item: the tokens the model reads when lm-eval scores it (context + continuation, less the last
    token, no special tokens: HFLM's default for causal models) and how many of them are context.
    The router reads exactly these, so it sees at training what it sees at scoring."""
    out = []
    for item in items:
        context = tokenizer(item.context, add_special_tokens=False)["input_ids"]
        whole = tokenizer(item.context + item.continuation, add_special_tokens=False)["input_ids"]
        out.append((whole, len(context)))
    return out


@torch.no_grad()
def pooled_features(model, inputs: list[tuple[list[int], int]]) -> torch.Tensor:
    """The shared model's mean-pooled final hidden state of each item, one row per item (as ``route`` reads it),
    on the CPU. A Twin model outside a routed forward is its shared model."""
    rows = []
    for whole, _ in inputs:
        ids = torch.tensor([whole[:-1]], device=model.device)
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        rows.append(pooled_hidden(hidden, None)[0])
    return torch.stack(rows).float().cpu()


@torch.no_grad()
def continuation_losses(model, inputs: list[tuple[list[int], int]]) -> torch.Tensor:
    """Each item's summed negative log-likelihood of its continuation under ``model``, on the CPU."""
    losses = []
    for whole, context in inputs:
        logits = model(input_ids=torch.tensor([whole[:-1]], device=model.device), use_cache=False).logits[0].float()
        targets = torch.tensor(whole[context:], device=model.device)
        losses.append(torch.nn.functional.cross_entropy(logits[context - 1 :], targets, reduction="sum"))
    return torch.stack(losses).cpu()
