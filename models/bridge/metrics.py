"""The bridge study's metrics, defined once (METHODS §4; log 004's evaluation made exact).

- answer accuracy: the output's first integer equals the problem's answer;
- entity transfer per category (numbers, names, nouns): the question's entities found in the
  output, pooled over problems (found / named), with its standard error; an entity counts once
  per problem however often the output repeats it;
- the mismatched-pair level of entity transfer: each output scored against another problem's
  question. A template that names common entities scores above zero without reading the input
  (log 004, V10: 26.5% transfer from 20 identical outputs), so transfer means something only
  above this level;
- output diversity: unique outputs / N (1 / N when every output is the same);
- batch similarity: the mean off-diagonal cosine between the flattened soft tokens of a batch
  (1 = every input maps to the same soft tokens; log 004's target < 0.5);
- RMS ratio: RMS of the soft tokens over RMS of the target's input embeddings (log 004, V6: an
  output at ~33x the embedding scale saturates the target's attention).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.bridge.corpus import CATEGORIES, Problem

_INT = re.compile(r"-?\d+")


def first_integer(text: str) -> int | None:
    """The first integer in ``text`` (None when there is none): the answer an output gives."""
    match = _INT.search(text)
    return int(match.group()) if match else None


def answer_accuracy(outputs: Sequence[str], problems: Sequence[Problem]) -> float:
    """Share of outputs whose first integer is the problem's answer."""
    _same_length(outputs, problems)
    return sum(first_integer(o) == p.answer for o, p in zip(outputs, problems, strict=True)) / len(
        problems)


def _mentions(text: str, entity: str) -> bool:
    """``entity`` as a whole word of ``text`` (a number inside a larger number does not count;
    a noun counts in its singular form too)."""
    words = set(re.findall(r"[A-Za-z]+|\d+", text))
    if entity in words:
        return True
    return entity.endswith("s") and entity[:-1] in words


@dataclass(frozen=True)
class Transfer:
    """Pooled entity transfer of one category: found / named over all problems, and its SE."""

    found: int
    named: int

    @property
    def rate(self) -> float:
        return self.found / self.named if self.named else math.nan

    @property
    def se(self) -> float:
        p = self.rate
        return math.sqrt(p * (1 - p) / self.named) if self.named else math.nan


def entity_transfer(outputs: Sequence[str], problems: Sequence[Problem],
                    ) -> dict[str, Transfer]:
    """Per category (and ``all``), the question's entities found in its output, pooled."""
    _same_length(outputs, problems)
    found = dict.fromkeys(CATEGORIES, 0)
    named = dict.fromkeys(CATEGORIES, 0)
    for out, problem in zip(outputs, problems, strict=True):
        for cat, ents in problem.entities().items():
            unique = set(ents)
            named[cat] += len(unique)
            found[cat] += sum(_mentions(out, e) for e in unique)
    per = {c: Transfer(found[c], named[c]) for c in CATEGORIES}
    per["all"] = Transfer(sum(found.values()), sum(named.values()))
    return per


def mismatched_transfer(outputs: Sequence[str], problems: Sequence[Problem], shift: int = 1,
                        ) -> dict[str, Transfer]:
    """Entity transfer of output i scored against problem i + ``shift`` (mod N): the level an
    output reaches without reading its own question."""
    _same_length(outputs, problems)
    n = len(problems)
    if n < 2 or shift % n == 0:
        raise ValueError(f"mismatched pairs need N >= 2 and a shift that is not a multiple of N "
                         f"(N={n}, shift={shift})")
    return entity_transfer(outputs, [problems[(i + shift) % n] for i in range(n)])


def output_diversity(outputs: Sequence[str]) -> float:
    """Unique outputs / N (after stripping surrounding whitespace)."""
    if not outputs:
        raise ValueError("output_diversity of no outputs")
    return len({o.strip() for o in outputs}) / len(outputs)


def batch_similarity(soft: torch.Tensor) -> float:
    """Mean off-diagonal cosine between the flattened soft tokens [B, K, D] of a batch."""
    if soft.shape[0] < 2:
        raise ValueError(f"batch_similarity needs a batch of >= 2 (got {soft.shape[0]})")
    flat = torch.nn.functional.normalize(soft.flatten(1).double(), dim=1)
    sim = flat @ flat.T
    b = sim.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (b * (b - 1)))


def rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def rms_ratio(soft: torch.Tensor, embeddings: torch.Tensor) -> float:
    """RMS(soft tokens) / RMS(target input embeddings): 1 = the scale the target was trained
    on."""
    return rms(soft) / rms(embeddings)


def _same_length(outputs: Sequence[str], problems: Sequence[Problem]) -> None:
    if len(outputs) != len(problems) or not problems:
        raise ValueError(f"{len(outputs)} outputs for {len(problems)} problems: need one output "
                         "per problem, at least one")
