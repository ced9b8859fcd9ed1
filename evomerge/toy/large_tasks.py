"""Larger variants of the toy world's objective task and its held-out twin, for measuring cheaper fitness.

The combined task asks each of its 94 search problems once (93 held out): too few items for scoring a
subset of them to pay, and one held-out item moves the score by 0.011. The large tasks ask every problem
in several variants: as it is, and after distinct context sentences in L2 (the kind of text the language
expert read, with no number in it), drawn from the world's seed. The held-out variants are built from
held-out problems only.

A context makes the question harder to read, and a number word in it harder still. On the full world (seed
0), the task-arithmetic grid point language 0.5, math 1.0 scored 0.32 on the plain questions, 0.15 after
the language expert's own sentences (``random_text``, which name numbers) and 0.25 after these number-free
ones, against 0.07, 0.15 and 0.19 for the language expert alone. On the large task as written: base 0.06,
math expert 0.05, language expert 0.18, language 0.5 and math 0.75 0.27 (held out 0.06, 0.05, 0.19, 0.22).

They are written beside the world's own tasks the first time they are asked for (``large_tasks``), so a
cached world gains them without its models being rebuilt, and its own tasks stay exactly as they are.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from evomerge.toy.curriculum import build_curriculum
from evomerge.toy.language import ADJECTIVES, NAMES, NOUNS, VERBS, translate
from evomerge.toy.spec import SPECS
from evomerge.toy.tasks import TaskItems, write_missing_tasks
from evomerge.toy.world import COMPLETE_MARKER, ToyWorld

SUFFIX = "_large"
# 94 x 11 = 1,034 search items and 93 x 11 = 1,023 held-out ones: the issue asks for at least 1,000 and 500,
# and a held-out score over 1,023 items has a standard error of about 0.014, so a difference of 0.03 shows.
VARIANTS = 11


def large_name(name: str) -> str:
    """``toy_combined`` -> ``toy_combined_large``, ``toy_combined_holdout`` -> ``toy_combined_large_holdout``."""
    stem, holdout, _ = name.partition("_holdout")
    return stem + SUFFIX + holdout


def context(rng: random.Random) -> str:
    """A short L2 sentence with no number word, in the words of the language expert's text."""
    name, adjective, noun, verb = rng.choice(NAMES), rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS)
    frame = rng.choice((f"the {adjective} {noun} .", f"{name} {verb} the {noun} .", f"the {noun} {verb} {name} ."))
    return translate(frame)


def with_contexts(items: TaskItems, *, variants: int, context: Callable[[random.Random], str], seed: str) -> TaskItems:
    """Each item as it is, then after ``variants - 1`` distinct context sentences drawn with ``context``
    from a generator seeded by ``seed`` and the task's name (so the search and held-out tasks differ)."""
    rng = random.Random(f"{seed}:{items.name}")
    prompts, answers = [], []
    for prompt, answer in zip(items.prompts, items.answers, strict=True):
        contexts: list[str] = []
        while len(contexts) < variants - 1:
            sentence = context(rng)
            if sentence not in contexts:
                contexts.append(sentence)
        prompts += [prompt, *(f"{sentence} {prompt}" for sentence in contexts)]
        answers += [answer] * variants
    description = f"{items.description}, each asked {variants} ways (as it is and after context sentences)"
    return TaskItems(large_name(items.name), description, prompts, answers)


def large_tasks(world: ToyWorld) -> tuple[str, str]:
    """Write the large combined task and its held-out twin into the world's tasks folder unless they are
    there already; their names, (search, held out)."""
    marker = json.loads((world.root / COMPLETE_MARKER).read_text())
    curriculum = build_curriculum(SPECS[marker["size"]], marker["seed"])
    item_sets = [
        with_contexts(
            split["combined"],
            variants=VARIANTS,
            context=context,
            seed=str(marker["seed"]),
        )
        for split in (curriculum.tasks, curriculum.holdout_tasks)
    ]
    write_missing_tasks(item_sets, world.tasks_dir)
    return item_sets[0].name, item_sets[1].name
