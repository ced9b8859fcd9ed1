"""The two skills and the task that needs both: "Vellish" number words, English arithmetic, Vellish arithmetic.

The paper's situation in small (Akiba et al. 2024: a Japanese model and an English math model, merged to do
math asked in Japanese). The lexicon expert learns ten invented Vellish words for the numbers zero to nine,
from counting lines and parallel sentences, never from sums; the math expert learns to add two English
number words, never seeing a Vellish word. "zib plus mok equals" then needs both: the base model adds
almost nothing (8-22% on sums in words, chance 12-14%), and the math expert reads a Vellish word as the unrelated text
it is. The answer is one English number word, one token, so each item is one loglikelihood request.

Which invented word means which number is drawn from the seed; the words themselves are fixed, chosen to
be short, pronounceable and not English.
"""

from __future__ import annotations

import random
import zlib

from evomerge.toy.tasks import TaskItems
from evomerge.toy.train import Sampler

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SUM_WORDS = (*NUMBER_WORDS, "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen")  # fmt: skip
# Each is one rare token after a space in SmolLM2's vocabulary, none a number word: a word is then one
# embedding row, which the lexicon expert can make look like its number's.
INVENTED = ("rul", "kel", "pim", "gor", "vex", "fro", "dro", "vor", "tok", "lum")

NAMES = ("Anna", "Tom", "Mia", "Leo", "Sara", "Omar", "Ines", "Ken", "Lucy", "Raj")
THINGS = ("cats", "apples", "books", "birds", "chairs", "coins", "boats", "cups", "trees", "keys")
VERBS = ("has", "sees", "buys", "finds", "wants", "keeps")
# Sentence frames for the parallel data the lexicon expert trains on, and different ones for its task:
# the task asks for a translation in a frame it never saw.
TRAIN_FRAMES = ("{name} {verb} {n} {thing}.", "There are {n} {thing} here.", "I counted {n} {thing} today.")
TASK_FRAMES = ("We need {n} {thing} now.", "Only {n} {thing} were left.")


def lexicon(seed: int) -> dict[int, str]:
    """Number -> Vellish word, a permutation drawn from the seed."""
    words = list(INVENTED)
    random.Random(seed).shuffle(words)
    return dict(enumerate(words))


def lexicon_sampler(seed: int) -> Sampler:
    """Glossary lines, counting in mixed English and Vellish, and Vellish sentences with their translation.

    Counting is what teaches a Vellish word to stand for its number inside a sentence, not only to be
    translated: after "zib, four," the next word depends on what "zib" is worth.
    """
    vellish = lexicon(seed)

    def glossary(rng: random.Random) -> str:
        n = rng.randrange(10)
        return rng.choice(
            (
                f"In Vellish, {vellish[n]} means {NUMBER_WORDS[n]}.",
                f"The Vellish word for {NUMBER_WORDS[n]} is {vellish[n]}.",
            )
        )

    def counting(rng: random.Random) -> str:
        start = rng.randrange(6)
        words = [vellish[n] if rng.random() < 0.5 else NUMBER_WORDS[n] for n in range(start, start + 5)]
        return "Counting: " + ", ".join(words) + "."

    def parallel(rng: random.Random) -> str:
        n = rng.randrange(10)
        frame = rng.choice(TRAIN_FRAMES)
        slots = {"name": rng.choice(NAMES), "verb": rng.choice(VERBS), "thing": rng.choice(THINGS)}
        return f"Vellish: {frame.format(n=vellish[n], **slots)} English: {frame.format(n=NUMBER_WORDS[n], **slots)}"

    parts = (glossary, counting, parallel, parallel)
    return lambda rng: rng.choice(parts)(rng)


def math_sampler() -> Sampler:
    """English sums of two number words, over all 100 pairs: the skill is the table itself, as a language
    model's arithmetic is; the combined task still asks every sum in words the math expert never saw."""

    def sample(rng: random.Random) -> str:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"Sum: {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} equals {SUM_WORDS[a + b]}."

    return sample


def split_pairs(seed: int) -> dict[str, list[tuple[int, int]]]:
    """All 100 operand pairs in two halves: the search half and the held-out half."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed + 1).shuffle(pairs)
    return {"search": pairs[:50], "holdout": pairs[50:]}


def _half(key: str) -> str:
    return "search" if zlib.crc32(key.encode()) % 2 == 0 else "holdout"


def task_items(seed: int) -> dict[str, dict[str, TaskItems]]:
    """``{"search" | "holdout": {"lexicon" | "math" | "combined": TaskItems}}``."""
    vellish = lexicon(seed)
    pairs = split_pairs(seed)
    rng = random.Random(seed + 2)
    lexicon_items: dict[str, tuple[list[str], list[str]]] = {"search": ([], []), "holdout": ([], [])}
    for n in range(10):
        for frame in TASK_FRAMES:
            slots = {"thing": rng.choice(THINGS)}
            english = frame.split("{n}")[0].rstrip()
            prompt = f"Vellish: {frame.format(n=vellish[n], **slots)} English: {english}"
            prompts, answers = lexicon_items[_half(prompt)]
            prompts.append(prompt)
            answers.append(NUMBER_WORDS[n])
    out: dict[str, dict[str, TaskItems]] = {}
    for half in ("search", "holdout"):
        suffix = "" if half == "search" else "_holdout"
        chosen = pairs[half]
        out[half] = {
            "lexicon": TaskItems(
                name=f"smol_lexicon{suffix}",
                description="translate a Vellish number word inside an unseen sentence frame",
                prompts=lexicon_items[half][0],
                answers=lexicon_items[half][1],
            ),
            "math": TaskItems(
                name=f"smol_math{suffix}",
                description="add two English number words",
                prompts=[f"Sum: {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} equals" for a, b in chosen],
                answers=[SUM_WORDS[a + b] for a, b in chosen],
            ),
            "combined": TaskItems(
                name=f"smol_combined{suffix}",
                description="add two Vellish number words, answer in English (needs both skills)",
                prompts=[f"Sum: {vellish[a]} plus {vellish[b]} equals" for a, b in chosen],
                answers=[SUM_WORDS[a + b] for a, b in chosen],
            ),
        }
    return out
