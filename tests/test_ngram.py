"""The n-gram baselines (models.nets.ngram): interpolated Kneser-Ney against its defining
equations, written here a second way (dicts over tuples, one token at a time)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from models.nets.ngram import kneser_ney_nll
from models.studies import baselines


def reference_kn(train: list[int], vocab: int, order: int):
    """P(w | context) of interpolated Kneser-Ney (Chen & Goodman 1998 section 3.5), from the
    counts as the equations state them."""
    grams = {m: Counter(tuple(train[i:i + m]) for i in range(len(train) - m + 1))
             for m in range(1, order + 1)}
    counts = {order: grams[order]}
    for m in range(order - 1, 0, -1):  # continuation counts: distinct left extensions
        counts[m] = Counter(g[1:] for g in counts[m + 1])
    disc = {}
    for m, c in counts.items():
        n1 = sum(v == 1 for v in c.values())
        n2 = sum(v == 2 for v in c.values())
        disc[m] = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
    ctx_sum: dict[int, dict] = {m: defaultdict(float) for m in counts}
    ctx_types: dict[int, dict] = {m: defaultdict(float) for m in counts}
    for m, c in counts.items():
        for g, v in c.items():
            ctx_sum[m][g[:-1]] += v
            ctx_types[m][g[:-1]] += 1

    def prob(w: int, ctx: tuple[int, ...]) -> float:
        p = 1.0 / vocab
        for m in range(1, order + 1):
            h = ctx[len(ctx) - (m - 1):] if m > 1 else ()
            s = ctx_sum[m].get(h, 0.0)
            if s > 0:
                d = disc[m]
                p = (max(counts[m].get((*h, w), 0) - d, 0.0) + d * ctx_types[m][h] * p) / s
        return p

    return prob


@pytest.mark.parametrize("order", [1, 2, 3])
def test_matches_the_defining_equations(order: int) -> None:
    rng = np.random.default_rng(order)
    vocab = 6
    train = rng.integers(0, vocab, 400)
    train[::5] = 3  # some structure, so that contexts differ
    val = rng.integers(0, vocab, 60)
    prob = reference_kn(train.tolist(), vocab, order)
    want = [-math.log(prob(int(val[i]), tuple(int(t) for t in val[i - 2:i])))
            for i in range(2, len(val))]
    np.testing.assert_allclose(kneser_ney_nll(train, val, vocab, order), want, rtol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_a_distribution_over_the_vocabulary_in_every_context(order: int) -> None:
    """Sums to 1 over the next token in every context, seen or not, and never assigns 0 (an
    unseen token costs a finite amount)."""
    rng = np.random.default_rng(0)
    vocab = 5
    train = rng.integers(0, vocab - 1, 300)  # token 4 never occurs
    for a in range(vocab):
        for b in range(vocab):
            nll = np.array([kneser_ney_nll(train, np.array([a, b, w]), vocab, order)[0]
                            for w in range(vocab)])
            assert np.isfinite(nll).all()
            assert np.exp(-nll).sum() == pytest.approx(1.0, abs=1e-12)


def second_order(n: int, seed: int, noise: float = 0.05) -> np.ndarray:
    """A second-order Markov chain over 8 symbols: x_t = table[x_{t-2}, x_{t-1}] (a fixed random
    table), replaced by a uniform symbol with probability ``noise`` (so the chain mixes)."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 8, size=(8, 8))
    x = [0, 1]
    for _ in range(n - 2):
        x.append(int(rng.integers(0, 8)) if rng.random() < noise else int(table[x[-2], x[-1]]))
    return np.array(x)


def test_context_is_what_separates_the_orders() -> None:
    """Each order gains what its context holds; the trigram, the chain's own order, reaches
    about the noise's entropy."""
    tokens = second_order(40000, seed=1)
    train, val = tokens[:30000], tokens[30000:]
    uni, bi, tri = (kneser_ney_nll(train, val, 8, n).mean() for n in (1, 2, 3))
    # the entropy of the trigram's true conditional: (1 - noise + noise/8) on the table's symbol
    p_top, p_rest = 1 - 0.05 + 0.05 / 8, 0.05 / 8
    entropy = -(p_top * math.log(p_top) + 7 * p_rest * math.log(p_rest))
    assert uni > bi + 0.3 and bi > tri + 0.3
    assert tri == pytest.approx(entropy, abs=0.03)


def test_language_model_baselines_judge_context() -> None:
    """baselines.language_model: the n-gram rows for the table, the bigram's margin a quarter of
    the trigram's gain over it."""
    tokens = second_order(6000, seed=2)
    h = baselines.language_model(tokens[:5000], tokens[5000:], 8, init_val_loss=math.log(8))
    by = {b["name"]: b for b in h["baselines"]}
    assert [b["name"] for b in h["baselines"]] == ["constant", "bigram", "trigram", "untrained"]
    assert all(by[n]["table"] for n in ("constant", "bigram", "trigram"))
    assert by["bigram"]["context"] and not by["trigram"]["judged"]
    gain = by["bigram"]["value"] - by["trigram"]["value"]
    assert gain > 0.3
    assert by["bigram"]["margin"] == pytest.approx(baselines.CONTEXT_SHARE * gain)
    with pytest.raises(ValueError, match="order"):
        kneser_ney_nll(tokens, tokens, 8, 4)
