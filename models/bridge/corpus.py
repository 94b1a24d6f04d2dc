"""Generated word problems with named entities and numbers: the bridge study's stand-in for
log 004's GSM8K (METHODS §4).

Every problem names one or two people, one kind of object and two numbers, and its answer is
one integer, so that both halves of log 004's evaluation are measurable on it: answer accuracy
(the target LM's first integer) and entity transfer (which of the question's names, nouns and
numbers the output repeats). Problems come from a few templates over fixed name and noun lists;
the operations keep every answer a small non-negative integer, and ``generate`` is a pure
function of its seed, so the corpus needs no download and is the same on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

NAMES = ("Mara", "Ilya", "Tomas", "Wen", "Aiko", "Bruno", "Chidi", "Dana", "Emeka", "Farah",
         "Goran", "Hana", "Ines", "Jonas", "Kofi", "Lena", "Mateo", "Nadia", "Oskar", "Priya",
         "Quinn", "Rosa", "Sven", "Talia")
# (singular, plural): an output may name the object either way
NOUNS = (("lantern", "lanterns"), ("apple", "apples"), ("marble", "marbles"),
         ("book", "books"), ("shell", "shells"), ("coin", "coins"), ("stamp", "stamps"),
         ("kite", "kites"), ("candle", "candles"), ("pebble", "pebbles"), ("ribbon", "ribbons"),
         ("button", "buttons"), ("feather", "feathers"), ("acorn", "acorns"),
         ("ticket", "tickets"), ("cookie", "cookies"))
CATEGORIES = ("numbers", "names", "nouns")


@dataclass(frozen=True)
class Problem:
    """One word problem: the question text, its integer answer, a statement that restates
    every entity of the question with the answer (what the target LM learns to say after the
    answer: from text it transfers all of them, so a bridge's entity transfer has a ceiling of
    1), and the entities."""

    question: str
    answer: int
    statement: str
    names: tuple[str, ...]
    nouns: tuple[str, ...]  # the plural forms used in the question
    numbers: tuple[int, ...]

    def entities(self) -> dict[str, tuple[str, ...]]:
        """The question's entities by category, as the strings an output would contain."""
        return {"numbers": tuple(str(n) for n in self.numbers), "names": self.names,
                "nouns": self.nouns}


Template = Callable[[random.Random, str, str, tuple[str, str]], Problem]


def _gives(rng: random.Random, a: str, b: str, noun: tuple[str, str]) -> Problem:
    x = rng.randint(3, 19)
    y = rng.randint(1, x - 1)
    q = f"{a} has {x} {noun[1]} and gives {y} to {b}. How many {noun[1]} does {a} have?"
    s = f"{a} had {x} {noun[1]} and gave {y} to {b}, so {a} has {x - y} {noun[1]}."
    return Problem(q, x - y, s, (a, b), (noun[1],), (x, y))


def _gets(rng: random.Random, a: str, b: str, noun: tuple[str, str]) -> Problem:
    x, y = rng.randint(1, 15), rng.randint(1, 15)
    q = f"{a} has {x} {noun[1]}. {b} gives {a} {y} more. How many {noun[1]} does {a} have?"
    s = f"{a} had {x} {noun[1]} and got {y} from {b}, so {a} has {x + y} {noun[1]}."
    return Problem(q, x + y, s, (a, b), (noun[1],), (x, y))


def _groups(rng: random.Random, a: str, b: str, noun: tuple[str, str]) -> Problem:
    x, y = rng.randint(2, 6), rng.randint(2, 6)
    q = f"{a} buys {x} boxes with {y} {noun[1]} in each box. How many {noun[1]} does {a} buy?"
    s = f"{a} bought {x} boxes of {y} {noun[1]}, so {a} buys {x * y} {noun[1]}."
    return Problem(q, x * y, s, (a,), (noun[1],), (x, y))


def _shares(rng: random.Random, a: str, b: str, noun: tuple[str, str]) -> Problem:
    y = rng.randint(2, 5)
    x = y * rng.randint(1, 6)
    q = (f"{a} shares {x} {noun[1]} equally between {y} friends. How many {noun[1]} does "
         "each friend get?")
    s = f"{a} shared {x} {noun[1]} between {y} friends, so each friend gets {x // y} {noun[1]}."
    return Problem(q, x // y, s, (a,), (noun[1],), (x, y))


TEMPLATES: tuple[Template, ...] = (_gives, _gets, _groups, _shares)


def generate(n: int, seed: int) -> list[Problem]:
    """``n`` problems, a pure function of ``seed`` (template, names, noun and numbers drawn
    uniformly; the two names of a problem differ)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        template = rng.choice(TEMPLATES)
        a, b = rng.sample(NAMES, 2)
        out.append(template(rng, a, b, rng.choice(NOUNS)))
    return out


def split(problems: list[Problem], n_val: int, n_test: int,
          ) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """(train, val, test): the last ``n_test`` problems are the test set, the ``n_val`` before
    them the val set; a question text in val or test never also appears in train."""
    if n_val + n_test >= len(problems):
        raise ValueError(f"n_val + n_test = {n_val + n_test} leaves no training problems of "
                         f"{len(problems)}")
    test = problems[len(problems) - n_test:]
    val = problems[len(problems) - n_test - n_val:len(problems) - n_test]
    held = {p.question for p in val + test}
    train = [p for p in problems[:len(problems) - n_test - n_val] if p.question not in held]
    return train, val, test
