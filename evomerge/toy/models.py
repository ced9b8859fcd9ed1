"""Train the base and the two experts, make the incompatible models, and save them as sharded HF folders."""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils.logging import disable_progress_bar

from evomerge.toy.curriculum import Curriculum
from evomerge.toy.language import TWINS, translate
from evomerge.toy.spec import WorldSpec
from evomerge.toy.train import ExtraLoss, Sampler, new_model, train


@dataclass(frozen=True)
class TrainedModels:
    base: LlamaForCausalLM
    experts: dict[str, LlamaForCausalLM]
    incompatible: dict[str, LlamaForCausalLM]
    seconds: dict[str, float]
    final_losses: dict[str, float]


def l2_rows(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(l2) for _, l2 in TWINS]


def start_l2_from_twins(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, scale: float, seed: int) -> None:
    """Set each L2 input embedding to its L1 twin's plus one offset shared by all L2 words.

    The base never saw L2, so its L2 rows are random; starting them from the twins (WECHSEL-style) makes
    alignment given rather than learned, which four earlier designs failed to learn. The shared offset
    is what keeps the base from reading L2: after RMSNorm a large common component drowns the word.
    """
    weight = model.get_input_embeddings().weight
    l1 = [tokenizer.convert_tokens_to_ids(word) for word, _ in TWINS]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mean_norm = weight[l1].norm(dim=1).mean()
        offset = torch.randn(weight.shape[1], generator=generator)
        offset = offset / offset.norm() * mean_norm * scale
        weight[l2_rows(tokenizer)] = weight[l1] + offset


def parallel_alignment(
    teacher: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, sample: Sampler, *, weight: float, batch_size: int
) -> ExtraLoss:
    """Loss on parallel sentences: the student's hidden states on an L2 sentence, after every layer and at
    every position, against the (frozen) teacher's on its L1 original, relative to the teacher's norm.

    L2 translates word for word, so positions line up one to one. This is how the toy world gets what
    large multilingual models have and tiny ones trained from scratch never learned here (TOYWORLD.md):
    a second language read through the same internal representations as the first.
    """

    def loss(student: LlamaForCausalLM, rng) -> torch.Tensor:
        l1 = [sample(rng) for _ in range(batch_size)]
        source = tokenizer(l1, padding=True, return_tensors="pt")
        target = tokenizer([translate(sentence) for sentence in l1], padding=True, return_tensors="pt")
        with torch.no_grad():
            wanted = teacher(input_ids=source.input_ids, output_hidden_states=True).hidden_states[1:]
        got = student(input_ids=target.input_ids, output_hidden_states=True).hidden_states[1:]
        mask = source.attention_mask.unsqueeze(-1).to(wanted[0].dtype)
        terms = [((g - w) ** 2 * mask).sum() / (w**2 * mask).sum() for g, w in zip(got, wanted, strict=True)]
        return weight * sum(terms) / len(terms)

    return loss


def train_models(
    spec: WorldSpec, seed: int, tokenizer: PreTrainedTokenizerFast, curriculum: Curriculum
) -> TrainedModels:
    seconds: dict[str, float] = {}
    losses: dict[str, float] = {}

    def timed_train(name: str, model: LlamaForCausalLM, **kwargs) -> None:
        start = time.perf_counter()
        trace = train(model, tokenizer, batch_size=spec.batch_size, **kwargs)
        seconds[name] = time.perf_counter() - start
        losses[name] = sum(trace[-20:]) / len(trace[-20:])

    base = new_model(spec, tokenizer, seed=seed)
    timed_train("base", base, sample=curriculum.base, steps=spec.base_steps, lr=spec.base_lr, seed=seed)
    start_l2_from_twins(base, tokenizer, spec.l2_offset_scale, seed + 1)

    lang = copy.deepcopy(base)
    # Stage 1, vocabulary: only the L2 rows move, and parallel sentences align them so that the base's
    # layers read L2 as they read L1.
    align = parallel_alignment(
        base, tokenizer, curriculum.parallel, weight=spec.align_weight, batch_size=spec.batch_size // 2
    )
    timed_train(
        "lang",
        lang,
        sample=curriculum.lang,
        steps=spec.expert_steps,
        lr=spec.lang_lr,
        seed=seed + 2,
        only_rows=l2_rows(tokenizer),
        extra_loss=align,
    )
    # Stage 2, continued pre-training on L2 text alone, every weight: the language expert now drifts from
    # the base and forgets its arithmetic, so adding its whole task vector damages the math expert's skill,
    # which is what makes default merges fall short and per-tensor search pay (results/toy_world.md).
    timed_train(
        "lang_continued", lang, sample=curriculum.l2_only, steps=spec.drift_steps, lr=spec.drift_lr, seed=seed + 6
    )
    math = copy.deepcopy(base)
    # The math expert leaves the input embeddings alone, so its skill lives in the layers (and lm_head),
    # where L2 words read through the aligned rows reach it.
    timed_train(
        "math",
        math,
        sample=curriculum.math,
        steps=spec.expert_steps,
        lr=spec.math_lr,
        seed=seed + 3,
        freeze_input_embeddings=True,
    )
    incompatible = {
        "hidden": new_model(spec, tokenizer, seed=seed + 4, hidden_size=spec.incompatible_hidden_size),
        "layers": new_model(spec, tokenizer, seed=seed + 5, num_layers=spec.incompatible_num_layers),
    }
    return TrainedModels(base, {"lang": lang, "math": math}, incompatible, seconds, losses)


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Save as a Hugging Face folder in at least two safetensors shards, as real checkpoints are, so that
    every reader in the project is exercised on ``model.safetensors.index.json``."""
    total_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    disable_progress_bar()
    model.save_pretrained(folder, max_shard_size=total_bytes // 3 + 1)
    tokenizer.save_pretrained(folder)
    if not (folder / "model.safetensors.index.json").exists():
        raise RuntimeError(f"{folder} was saved unsharded; the toy world needs sharded checkpoints")


def tensor_digest(folder: Path) -> str:
    """A hash of every saved tensor's name, dtype, shape and bytes, independent of shard layout."""
    digest = hashlib.sha256()
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
