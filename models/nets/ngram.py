"""Count-based n-gram language models: the baselines every language-model row must beat.

A transformer that is no better than a character bigram has learned nothing about context; these
models say what "no context" (unigram), "one token of context" (bigram) and "two tokens"
(trigram) reach on the same tokens, counted by the same pipeline.

Smoothing: **interpolated Kneser-Ney** (Chen & Goodman 1998, section 3.5), one absolute discount
per order, ``D = n1 / (n1 + 2 n2)`` from that order's count-of-counts:

    P_m(w | c) = [max(C_m(c w) - D_m, 0) + D_m T_m(c) P_{m-1}(w | c')] / S_m(c)

with c' the context less its oldest token, ``S_m(c) = sum_w C_m(c w)``, ``T_m(c)`` the number of
distinct w with ``C_m(c w) > 0``, ``P_m = P_{m-1}`` for a context never seen, and ``P_0`` uniform
over the vocabulary (so unseen tokens keep a finite cost). ``C_m`` are raw counts at the model's
own order and continuation counts (the number of distinct tokens seen before the m-gram) below
it, which is what makes it Kneser-Ney rather than absolute discounting.

Tables are sorted int64 keys (``np.unique`` / ``np.searchsorted``), never dense V^n arrays, so a
BPE vocabulary of 4096 costs what a character one does.
"""

from __future__ import annotations

import numpy as np

MAX_ORDER = 3  # (V^3 keys fit int64 for any uint16 vocabulary)


class _Level:
    """The count table of one order m: keys of m-grams with their counts, and per context
    (the m-gram less its last token) the sum ``S`` and the number of types ``T``."""

    def __init__(self, keys: np.ndarray, counts: np.ndarray, vocab: int) -> None:
        self.keys, self.counts = keys, counts.astype(np.float64)
        self.ctx, inverse = np.unique(keys // vocab, return_inverse=True)
        self.ctx_sum = np.bincount(inverse, weights=self.counts)
        self.ctx_types = np.bincount(inverse).astype(np.float64)
        n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
        self.discount = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5

    @staticmethod
    def lookup(table: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
        """``values`` at the positions of ``query`` in the sorted ``table``, 0 where absent."""
        if table.size == 0:
            return np.zeros(query.shape)
        i = np.minimum(np.searchsorted(table, query), table.size - 1)
        return np.where(table[i] == query, values[i], 0.0)


def _grams(tokens: np.ndarray, m: int, vocab: int) -> np.ndarray:
    """Keys of every m-gram of ``tokens`` (base-``vocab`` numbers, oldest token first)."""
    key = np.zeros(len(tokens) - m + 1, dtype=np.int64)
    for j in range(m):
        key = key * vocab + tokens[j:len(tokens) - m + 1 + j]
    return key


def _levels(train: np.ndarray, order: int, vocab: int) -> list[_Level]:
    """Count tables for orders 1..order: raw counts at ``order``, continuation counts below."""
    keys, counts = np.unique(_grams(train, order, vocab), return_counts=True)
    levels = [_Level(keys, counts, vocab)]
    for m in range(order - 1, 0, -1):
        # continuation count of an m-gram: the distinct (m+1)-grams that end with it
        suffix = levels[-1].keys % vocab**m
        keys, counts = np.unique(suffix, return_counts=True)
        levels.append(_Level(keys, counts, vocab))
    return levels[::-1]  # levels[m - 1] is order m


def kneser_ney_nll(train: np.ndarray, val: np.ndarray, vocab: int, order: int,
                   start: int = MAX_ORDER - 1) -> np.ndarray:
    """Per-token negative log-likelihood (nats) of ``val[start:]`` under the interpolated
    Kneser-Ney model of ``order`` (1-3) counted on ``train``; each token is predicted from the
    ``order - 1`` tokens before it in ``val``. The same ``start`` for every order scores the same
    tokens, so the orders compare like for like."""
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"n-gram order must be 1..{MAX_ORDER}, got {order}")
    if start < order - 1:
        raise ValueError(f"start={start} leaves the first tokens without {order - 1} of context")
    train = np.asarray(train, dtype=np.int64)
    val = np.asarray(val, dtype=np.int64)
    levels = _levels(train, order, vocab)
    target = val[start:]
    prob = np.full(target.shape, 1.0 / vocab)  # P_0: uniform
    for m, level in enumerate(levels, start=1):
        # the m-gram ending at each target: the m - 1 tokens before it, then the target
        gram = np.zeros(target.shape, dtype=np.int64)
        for j in range(m - 1, 0, -1):
            gram = gram * vocab + val[start - j:len(val) - j]
        ctx = gram
        gram = gram * vocab + target
        count = level.lookup(level.keys, level.counts, gram)
        s = level.lookup(level.ctx, level.ctx_sum, ctx)
        t = level.lookup(level.ctx, level.ctx_types, ctx)
        d = level.discount
        seen = s > 0
        prob = np.where(seen, (np.maximum(count - d, 0.0) + d * t * prob) / np.where(seen, s, 1.0),
                        prob)
    return -np.log(prob)
