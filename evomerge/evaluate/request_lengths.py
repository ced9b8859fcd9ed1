"""How long the tasks' requests are, in tokens, before any model is loaded.

A worker sizes its reserve for scoring (executor/memory.py) from them: one batch of the longest requests
lm-eval will send, instead of full-length batches. With a 262k vocabulary the float32 logits of 32 requests
of 2,048 tokens take 64 GiB, where tasks of 20-token requests need a few MiB.

lm-eval builds the requests once its tasks are built (``Task.build_all_requests``, as its evaluator calls
it); the tasks are built here as the scorer builds them (evaluate/lm_eval_scorer.py), the datasets then
read from their cache when the scorer builds them again.
"""

from __future__ import annotations

from dataclasses import dataclass

from evomerge.evaluate.lm_eval_scorer import TaskSet, _fewshot_for, _quiet, _subsample, _task_manager

# lm-eval's HFLM generates this many tokens unless the task's (or the user's) generation kwargs say.
DEFAULT_MAX_GEN_TOKS = 256


@dataclass(frozen=True)
class RequestLengths:
    """The longest request of each kind, in tokens (0: no request of that kind); None where unknown."""

    scored: int | None  # loglikelihood: context and continuation, the logits of every position kept
    generated: int  # generate_until: context and the tokens it may generate, the logits of the last kept


def request_lengths(tasks: TaskSet, tokenizer) -> RequestLengths:
    """The longest requests ``tasks`` send, tokenized with ``tokenizer``. A rolling loglikelihood (perplexity
    over whole documents, cut in windows of lm-eval's length) is of unknown length: ``scored`` is None."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        loaded = _task_manager(TaskManager, tasks).load(list(tasks.names))
    leaves = loaded["tasks"]
    samples = _subsample(leaves, tasks.limit, tasks.sample_seed)
    scored: int | None = 0
    generated = 0
    for name, task in leaves.items():
        fewshot = _fewshot_for(tasks.num_fewshot, name, loaded.get("group_map", {}))
        if fewshot is not None:
            task.set_config(key="num_fewshot", value=fewshot)
        if tasks.gen_kwargs and task.get_config("output_type") == "generate_until":
            task.set_config(key="generation_kwargs", value=dict(tasks.gen_kwargs), update=True)
        task.set_fewshot_seed(seed=tasks.sample_seed)
        with _quiet():
            task.build_all_requests(
                samples=None if samples is None else samples[name],
                system_instruction=tasks.system_instruction,
                apply_chat_template=bool(tasks.apply_chat_template),
                fewshot_as_multiturn=tasks.fewshot_as_multiturn,
                chat_template=_chat_template(tokenizer) if tasks.apply_chat_template else None,
            )
        for instance in task.instances:
            if instance.request_type == "loglikelihood_rolling":
                scored = None
            elif instance.request_type == "generate_until":
                context, kwargs = instance.args[0], instance.args[1] if len(instance.args) > 1 else {}
                budget = int((kwargs or {}).get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
                generated = max(generated, _tokens(tokenizer, context) + budget)
            elif scored is not None:  # loglikelihood, multiple choice: context and continuation, one pass
                context, continuation = instance.args[:2]
                scored = max(scored, _tokens(tokenizer, context) + _tokens(tokenizer, continuation, special=False))
    return RequestLengths(scored=scored, generated=generated)


def _tokens(tokenizer, text: str, *, special: bool = True) -> int:
    """Tokens of ``text``, with the tokenizer's special tokens (a BOS) where ``special``: never fewer than
    lm-eval's encoding of the same text."""
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_template(tokenizer):
    """What lm-eval's ``HFLM.apply_chat_template`` renders a chat with, for the lengths only."""

    def render(history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return tokenizer.apply_chat_template(
            history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    return render
