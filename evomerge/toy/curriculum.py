"""What each toy model is trained on and what each toy task asks, drawn deterministically from a seed.

The premise follows the seed paper's (a model weak in Japanese, a Japanese model, an English math model):
- the base reads L1 only, knows the "... count is N" answer pattern, and has seen a little arithmetic
  (operands up to 4), so it is weak at math and cannot read L2 at all;
- the language expert learns L2 in two stages: its vocabulary first (text and count statements, which
  contain the answer pattern, plus parallel L1/L2 sentences), then continued pre-training on L2 text
  alone, which costs it the base's arithmetic (as a Japanese continued-pre-training model is weak at math);
- the math expert learns all 187 L1 problems;
- the combined task asks the same problems in L2, which neither expert has seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from evomerge.toy.language import (
    CountStatement,
    Problem,
    all_count_statements,
    all_problems,
    code_switch,
    random_text,
    solved,
    translate,
)
from evomerge.toy.spec import WorldSpec
from evomerge.toy.tasks import TaskItems
from evomerge.toy.train import Sampler, mixture

BASE_MATH_MAX_OPERAND = 4
LANG_EVAL_FRACTION = 0.25


@dataclass(frozen=True)
class Curriculum:
    base: Sampler
    lang: Sampler
    parallel: Sampler  # L1 sentences whose word-for-word L2 translation the language expert aligns to
    l2_only: Sampler
    math: Sampler
    tasks: dict[str, TaskItems]
    holdout_tasks: dict[str, TaskItems]


def _choose(items: list) -> Sampler:
    return lambda rng: solved(rng.choice(items))


def _items(name: str, description: str, items: list[Problem] | list[CountStatement], l2: bool) -> TaskItems:
    prompts = [translate(item.prompt) if l2 else item.prompt for item in items]
    return TaskItems(name, description, prompts, [str(item.answer) for item in items])


def build_curriculum(spec: WorldSpec, seed: int) -> Curriculum:
    rng = random.Random(seed)
    statements = all_count_statements()
    rng.shuffle(statements)
    n_eval = int(len(statements) * LANG_EVAL_FRACTION)
    eval_statements, train_statements = statements[:n_eval], statements[n_eval:]
    problems = all_problems()
    rng.shuffle(problems)
    # Each task gets a second, disjoint half ("holdout") so a search that tunes on one half can be checked
    # on the other. The math expert trains on every L1 problem: like MGSM-JA (GSM8k translated), the
    # combined task tests transfer of what it learned to another language, not generalisation.
    search_problems, holdout_problems = problems[::2], problems[1::2]
    lang_search, lang_holdout = eval_statements[::2], eval_statements[1::2]
    base_problems = [p for p in problems if max(p.first, p.second) <= BASE_MATH_MAX_OPERAND]

    l1_text = random_text
    l2_text: Sampler = lambda r: translate(random_text(r))  # noqa: E731
    l1_counts = _choose(train_statements)
    l2_counts: Sampler = lambda r: translate(l1_counts(r))  # noqa: E731
    base = mixture(
        [
            (0.7 - spec.base_math_fraction, l1_text),
            (0.3, l1_counts),
            (spec.base_math_fraction, _choose(base_problems)),
        ]
    )
    # Code-switched sentences (each word in L2 with probability 1/2) put L2 words where the base's L1
    # circuits read them, which pulls their embeddings toward their twins (TOYWORLD.md, rounds 2-3).
    code_switched: Sampler = lambda r: code_switch(r.choice([random_text(r), l1_counts(r)]), r)  # noqa: E731
    monolingual = 1 - spec.code_switch_fraction
    l2_data = mixture(
        [(0.6 * monolingual, l2_text), (0.4 * monolingual, l2_counts), (spec.code_switch_fraction, code_switched)]
    )
    lang = mixture([(1 - spec.replay_fraction, l2_data), (spec.replay_fraction, base)])
    parallel = mixture([(0.5, l1_text), (0.5, l1_counts)])
    l2_only = mixture([(0.6, l2_text), (0.4, l2_counts)])
    math = mixture([(1 - spec.replay_fraction, _choose(problems)), (spec.replay_fraction, base)])

    lang_items = {"": lang_search, "_holdout": lang_holdout}
    math_items = {"": search_problems, "_holdout": holdout_problems}

    def describe(kind: str, split: str) -> dict[str, TaskItems]:
        return {
            "lang": _items(f"toy_lang{split}", f"L2 count statement -> numeral{kind}", lang_items[split], True),
            "math": _items(f"toy_math{split}", f"L1 arithmetic -> numeral{kind}", math_items[split], False),
            "combined": _items(
                f"toy_combined{split}", f"L1 arithmetic asked in L2 -> numeral{kind}", math_items[split], True
            ),
        }

    return Curriculum(
        base=base,
        lang=lang,
        parallel=parallel,
        l2_only=l2_only,
        math=math,
        tasks=describe("", ""),
        holdout_tasks=describe(" (held out from search)", "_holdout"),
    )
