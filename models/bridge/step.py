"""One bridge training step and the bridged target's answers (METHODS §4).

A batch of problems becomes: the source's states at ``layer`` for ``Question: <q>`` (frozen
source, no gradient), the suffix the target must produce after the soft tokens (``Answer: <a> .
<statement>``, or with ``autoencode`` the question first, log 004 V10) with the primer unscored,
and the target embeddings of the answer text (the anchors' reference). The loss is the weighted
sum of ``models.bridge.terms``; every term is returned by name (with its weight applied
separately), so the health checks can read each term's value and gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.bridge import terms
from models.bridge.bridge import Bridge, soft_prompt_loss
from models.bridge.corpus import Problem
from models.bridge.lms import PRIMER, answer_steps, decode_answer, greedy, source_text
from models.config.bridge import TermWeights
from models.data.tokens import CharCodec, WordCodec
from models.nets.transformer import TransformerLM


@dataclass
class Batch:
    h: Tensor            # source states [B, T, C_s]
    pad: Tensor          # their padding [B, T]
    suffix: Tensor       # target ids after the soft tokens [B, M]
    labels: Tensor       # suffix ids to score, -100 elsewhere [B, M]
    answer: Tensor       # target ids of the answer text [B, A]
    answer_pad: Tensor   # [B, A]


def _pad(seqs: Sequence[list[int]], fill: int) -> tuple[Tensor, Tensor]:
    n = max(len(s) for s in seqs)
    out = torch.full((len(seqs), n), fill, dtype=torch.long)
    pad = torch.ones(len(seqs), n, dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s)
        pad[i, :len(s)] = False
    return out, pad


@torch.no_grad()
def source_states(source: TransformerLM, codec: CharCodec, problems: Sequence[Problem],
                  layer: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The source's residual stream after block ``layer`` (0 = embeddings) for each question,
    right-padded; causal attention keeps the real positions independent of the padding."""
    ids, pad = _pad([codec.encode(source_text(p)) for p in problems], 0)
    states = source.hidden_states(ids.to(device))
    return states[layer], pad.to(device)


def make_batch(problems: Sequence[Problem], source: TransformerLM, src_codec: CharCodec,
               tgt_codec: WordCodec, layer: int, autoencode: bool, device: torch.device,
               primer: str = PRIMER) -> Batch:
    h, pad = source_states(source, src_codec, problems, layer, device)
    n_primer = len(tgt_codec.encode(primer))
    suffixes, labels, answers = [], [], []
    for p in problems:
        answer = tgt_codec.encode(f"{p.answer} . {p.statement}")
        question = tgt_codec.encode(f"Question: {p.question}") if autoencode else []
        ids = question + tgt_codec.encode(primer) + answer
        suffixes.append(ids)
        labels.append(question + [-100] * n_primer + answer)
        answers.append(answer)
    suffix, _ = _pad(suffixes, 0)
    label, _ = _pad(labels, -100)
    answer, answer_pad = _pad(answers, 0)
    return Batch(h, pad, suffix.to(device), label.to(device), answer.to(device),
                 answer_pad.to(device))


def loss_terms(bridge: Bridge, target: TransformerLM, batch: Batch, w: TermWeights,
               recon_head: nn.Module | None = None) -> dict[str, Tensor]:
    """Every term with a non-zero weight, unweighted, by name (``term/<name>``)."""
    pre = bridge.pre_output(batch.h, batch.pad)
    s = bridge.output_map(pre)
    out: dict[str, Tensor] = {}
    if w.lm:
        out["lm"] = soft_prompt_loss(target, s, batch.suffix, batch.labels)
    if w.recon:
        if recon_head is None:
            raise ValueError("the recon term needs a recon head (soft-token -> source space)")
        out["recon"] = terms.recon_cos(recon_head(s), bridge.norm.whiten(batch.h), batch.pad)
    if w.contrastive:
        out["contrastive"] = terms.info_nce(s)
    if w.anchor_cos or w.anchor_mse:
        e = target.tok(batch.answer).detach()
        if w.anchor_cos:
            out["anchor_cos"] = terms.anchor_cos(s, e, batch.answer_pad)
        if w.anchor_mse:
            out["anchor_mse"] = terms.anchor_mse(s, e, batch.answer_pad)
    if w.batch_div:
        out["batch_div"] = terms.batch_similarity_loss(s)
    if w.unique_div:
        codes = bridge.codes(pre) if bridge.shape.output == "fsq" else s.round(decimals=3)
        out["unique_div"] = terms.unique_ratio_loss(codes)
    return out


def total(values: dict[str, Tensor], w: TermWeights) -> Tensor:
    return sum(getattr(w, name) * v for name, v in values.items())  # type: ignore[return-value]


@torch.no_grad()
def bridged_answers(bridge: Bridge | None, target: TransformerLM, tgt_codec: WordCodec,
                    batch: Batch, problems: Sequence[Problem], shuffle: int = 0,
                    primer: str = PRIMER) -> list[str]:
    """The frozen target's greedy answers after [soft tokens, primer]; ``bridge=None`` is the
    primer-only baseline (no soft tokens); ``shuffle`` > 0 gives each problem the soft tokens of
    problem i + shuffle (the batch-shuffled baseline)."""
    primer_ids = torch.tensor(tgt_codec.encode(primer), device=batch.suffix.device)
    prefix = target.tok(primer_ids).expand(len(problems), -1, -1)
    if bridge is not None:
        s = bridge(batch.h, batch.pad)
        if shuffle:
            s = s.roll(-shuffle, dims=0)
        prefix = torch.cat([s, prefix], dim=1)
    ids = greedy(target, prefix, answer_steps(problems, tgt_codec))
    return [decode_answer(tgt_codec, row) for row in ids.tolist()]
