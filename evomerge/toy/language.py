"""The toy world's two languages and the sentences they are spoken in.

L1 and L2 share one grammar and one set of concepts; every L2 word is a separate token (the L1 word
spelled backwards plus "u"), so L2 is "a second vocabulary for the same words". Answers are numerals
("0".."20") shared by both languages, as MGSM scores the final numeral whatever the question's language:
an answer in the question's language made the math expert's task vector erase L2 (TOYWORLD.md, round 1).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NUMERALS = tuple(str(value) for value in range(21))
NAMES = ("anna", "bob", "carl", "dora")
NOUNS = ("cats", "dogs", "birds", "fish", "apples", "trees", "cups", "boxes")
ADJECTIVES = ("red", "big", "small", "old")
VERBS = ("sees", "likes", "wants", "finds")
FUNCTION_WORDS = ("has", "gives", "and", "plus", "minus", "so", "the", "count", "is", "then", "more", ".", ",")
L1_WORDS = NUMBER_WORDS + NAMES + NOUNS + ADJECTIVES + VERBS + FUNCTION_WORDS
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def to_l2(word: str) -> str:
    """The L2 twin of an L1 word; punctuation stays shared, like the numerals."""
    if word in (".", ","):
        return word
    return word[::-1] + "u"


L2_WORDS = tuple(to_l2(word) for word in L1_WORDS if word not in (".", ","))
# Twins are the pairs whose alignment is measured; numerals and punctuation are shared, not twinned.
TWINS = tuple((word, to_l2(word)) for word in L1_WORDS if word not in (".", ","))
assert not set(L2_WORDS) & set(L1_WORDS), "an L2 spelling collides with an L1 word"


def translate(sentence: str) -> str:
    """The same sentence in L2: word order and numerals unchanged, every L1 word replaced by its twin."""
    return " ".join(to_l2(word) if word in L1_WORDS else word for word in sentence.split())


@dataclass(frozen=True)
class Problem:
    """One arithmetic question; ``prompt`` ends before the answer numeral."""

    first: int
    operator: str
    second: int

    @property
    def answer(self) -> int:
        return self.first + self.second if self.operator == "plus" else self.first - self.second

    @property
    def prompt(self) -> str:
        return f"{NUMBER_WORDS[self.first]} {self.operator} {NUMBER_WORDS[self.second]} is"


def all_problems() -> list[Problem]:
    """Every plus and minus problem over 0..10 whose answer is a numeral in 0..20 (187 problems)."""
    plus = [Problem(a, "plus", b) for a in range(11) for b in range(11)]
    minus = [Problem(a, "minus", b) for a in range(11) for b in range(a + 1)]
    return plus + minus


@dataclass(frozen=True)
class CountStatement:
    """A sentence that names a quantity in words and then states it as a numeral: the answer pattern."""

    name: str
    count: int
    noun: str

    @property
    def prompt(self) -> str:
        return f"{self.name} has {NUMBER_WORDS[self.count]} {self.noun} , so the count is"

    @property
    def answer(self) -> int:
        return self.count


def all_count_statements() -> list[CountStatement]:
    return [CountStatement(name, count, noun) for name in NAMES for count in range(11) for noun in NOUNS]


def random_text(rng: random.Random) -> str:
    """A plain L1 sentence with no numeral; "plus" and "minus" appear as words, never as sums to compute,
    so that a language learner meets every word the math questions use (a real L2 corpus would)."""
    name, other = rng.sample(NAMES, 2)
    number, count = rng.randrange(11), rng.randrange(11)
    adjective, noun, verb = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS)
    templates: tuple[Callable[[], str], ...] = (
        lambda: f"{name} {verb} {NUMBER_WORDS[number]} {adjective} {noun} .",
        lambda: f"the {adjective} {noun} {verb} {other} and {name} .",
        lambda: f"{name} gives {other} {NUMBER_WORDS[number]} {noun} , then {other} has more {noun} .",
        lambda: f"{name} has {NUMBER_WORDS[number]} {noun} plus {NUMBER_WORDS[count]} {adjective} {noun} .",
        lambda: f"{other} {verb} {NUMBER_WORDS[number]} {noun} minus {NUMBER_WORDS[count]} {noun} .",
        lambda: f"the count is {NUMBER_WORDS[number]} and {name} {verb} the {noun} .",
    )
    return rng.choice(templates)()


def solved(item: Problem | CountStatement) -> str:
    """The item's prompt followed by its answer numeral: one training sentence."""
    return f"{item.prompt} {item.answer}"


def code_switch(sentence: str, rng: random.Random, probability: float = 0.5) -> str:
    """The sentence with each word independently put into L2 with the given probability."""
    words = sentence.split()
    return " ".join(to_l2(word) if word in L1_WORDS and rng.random() < probability else word for word in words)
