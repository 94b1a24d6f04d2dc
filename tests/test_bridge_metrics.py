"""Identities of the bridge study's corpus and metrics (models.bridge)."""

from __future__ import annotations

import math

import pytest
import torch

from models.bridge.corpus import CATEGORIES, Problem, generate, split
from models.bridge.metrics import (
    answer_accuracy,
    batch_similarity,
    entity_transfer,
    first_integer,
    mismatched_transfer,
    output_diversity,
    rms_ratio,
)


def test_generate_is_a_pure_function_of_its_seed_and_answers_are_right() -> None:
    a, b = generate(200, seed=3), generate(200, seed=3)
    assert a == b and a != generate(200, seed=4)
    for p in a:
        x, y = p.numbers
        assert p.answer in {x - y, x + y, x * y, x // y} and p.answer >= 0
        assert all(str(n) in p.question for n in p.numbers)
        assert all(e in p.question for e in p.names + p.nouns)
        assert str(p.answer) in p.statement
        assert entity_transfer([p.statement], [p])["all"].rate == 1.0  # restates every entity
    assert {p.question.split()[1] for p in a} >= {"has", "buys", "shares"}  # every template


def test_split_keeps_held_out_questions_out_of_train() -> None:
    train, val, test = split(generate(500, seed=0), n_val=50, n_test=100)
    assert len(val) == 50 and len(test) == 100
    assert not {p.question for p in train} & {p.question for p in val + test}
    with pytest.raises(ValueError, match="leaves no training"):
        split(generate(10, seed=0), n_val=5, n_test=5)


def test_an_output_that_repeats_its_question_transfers_every_entity() -> None:
    problems = generate(50, seed=1)
    full = entity_transfer([p.question for p in problems], problems)
    assert all(full[c].rate == 1.0 and full[c].se == 0.0 for c in (*CATEGORIES, "all"))
    none = entity_transfer([""] * len(problems), problems)
    assert all(none[c].found == 0 for c in none)
    assert full["all"].named == sum(len(set(v)) for p in problems for v in p.entities().values())


def test_entity_matching_is_by_whole_word_and_counts_singular_nouns() -> None:
    p = Problem("Mara has 7 apples and gives 3 to Ilya. How many apples does Mara have?", 4,
                "Mara has 4 apples.", ("Mara", "Ilya"), ("apples",), (7, 3))
    t = entity_transfer(["Mara keeps 17 of her apple"], [p])
    assert (t["names"].found, t["nouns"].found, t["numbers"].found) == (1, 1, 0)  # 17 is not 7
    assert t["all"].rate == pytest.approx(2 / 5)


def test_mismatched_pairs_measure_what_a_template_scores_without_reading() -> None:
    problems = generate(40, seed=2)
    template = ["Mara has 4 apples"] * len(problems)  # one output for every input
    own, other = entity_transfer(template, problems), mismatched_transfer(template, problems)
    # an input-independent output scores the same against any permutation of the questions
    assert own["all"].found == other["all"].found and own["all"].named == other["all"].named
    honest = [p.question for p in problems]
    assert entity_transfer(honest, problems)["all"].rate == 1.0
    assert mismatched_transfer(honest, problems)["all"].rate < 0.5  # others' entities, rarely
    with pytest.raises(ValueError, match="shift"):
        mismatched_transfer(honest, problems, shift=len(problems))


def test_answer_accuracy_reads_the_first_integer() -> None:
    problems = generate(3, seed=5)
    outs = [f"{p.answer} {p.answer + 1}" for p in problems]
    assert answer_accuracy(outs, problems) == 1.0
    assert answer_accuracy([f"{p.answer + 1} {p.answer}" for p in problems], problems) == 0.0
    assert first_integer("no digits") is None and first_integer("x -3 y") == -3
    with pytest.raises(ValueError, match="one output per problem"):
        answer_accuracy(outs[:2], problems)


def test_diversity_similarity_and_rms_ratio_identities() -> None:
    assert output_diversity(["a", "a ", "b", "c"]) == 0.75
    assert output_diversity(["same"] * 10) == pytest.approx(0.1)
    torch.manual_seed(0)
    s = torch.randn(1, 4, 8)
    assert batch_similarity(s.repeat(5, 1, 1)) == pytest.approx(1.0)  # collapsed
    eye = torch.eye(6).view(6, 2, 3)
    assert batch_similarity(eye) == pytest.approx(0.0)  # orthogonal inputs
    emb = torch.randn(100, 8)
    assert rms_ratio(emb, emb) == pytest.approx(1.0)
    assert rms_ratio(10 * emb, emb) == pytest.approx(10.0)  # log 004 V6's overload reads as 10
    assert math.isnan(entity_transfer(["x"], [Problem("q", 0, "", (), (), ())])["all"].rate)
