"""Log 004's failure modes made to happen with the pipeline's own bridge code, each flagged by
its detector, which stays silent on the healthy counterpart (METHODS §4-5)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from models.bridge.bridge import Bridge, BridgeShape, soft_prompt_loss
from models.bridge.corpus import generate
from models.bridge.lms import PRIMER, build_codecs, target_text
from models.bridge.metrics import rms_ratio
from models.bridge.step import Batch, loss_terms
from models.config.bridge import TermWeights
from models.health.losses import dead_loss_term, no_gradient_path
from models.health.outputs import (
    codebook_collapse,
    magnitude_mismatch,
    posterior_collapse,
    tanh_saturation,
)
from models.health.recorders import term_grad_norm
from models.nets.transformer import TransformerLM, TransformerShape

pytestmark = pytest.mark.usefixtures("one_thread")

SRC, TGT, K = 12, 16, 4


def parts(output: str = "none", tgt_std: float = 0.02, **shape: object,
          ) -> tuple[Bridge, TransformerLM, Batch]:
    torch.manual_seed(0)
    target = TransformerLM(TransformerShape(vocab_size=30, block_size=24, n_embd=TGT, n_head=2))
    for p in target.parameters():
        p.requires_grad_(False)
    emb = target.tok.weight
    stats = {"src_mean": torch.zeros(SRC), "src_std": torch.ones(SRC),
             "tgt_mean": torch.zeros(TGT), "tgt_std": torch.full((TGT,), tgt_std),
             "tgt_rms": emb.pow(2).mean().sqrt()}
    bridge = Bridge(BridgeShape(src_dim=SRC, tgt_dim=TGT, k=K, depth=1, n_head=2, output=output,
                                **shape), stats)
    b = 6
    suffix = torch.randint(1, 30, (b, 5))
    labels = suffix.clone()
    labels[:, 0] = -100
    answer = torch.randint(1, 30, (b, 3))
    batch = Batch(torch.randn(b, 7, SRC), torch.zeros(b, 7, dtype=torch.bool), suffix, labels,
                  answer, torch.zeros(b, 3, dtype=torch.bool))
    return bridge, target, batch


def test_v15f_diversity_from_a_float_has_no_gradient_path() -> None:
    bridge, target, batch = parts("fsq", fsq_levels=(3, 3, 3))
    terms = loss_terms(bridge, target, batch, TermWeights(lm=1.0, unique_div=0.1))
    params = list(bridge.parameters())
    lm, div = term_grad_norm(terms["lm"], params), term_grad_norm(terms["unique_div"], params)
    assert lm.norm > 0 and not lm.no_grad_path  # the LM term trains the bridge
    assert div.no_grad_path
    (finding,) = no_gradient_path(pd.DataFrame({"step": [0]}), ["unique_div"])
    assert "unique_div" in finding.message


def test_v3_mse_anchor_at_a_10x_scale_mismatch_is_a_dead_term() -> None:
    """s at ~0.003 RMS against answer embeddings at ~0.03: the MSE of their means is ~1e-6
    while the LM term is ~3 nats; the cosine anchor of the same tensors is not dead."""
    bridge, target, batch = parts("tanh", init_scale=0.1)
    with torch.no_grad():
        target.tok.weight.mul_(0.03 / target.tok.weight.pow(2).mean().sqrt())
        bridge.tgt_rms = 0.03
    rows = []
    for step in range(6):
        t = loss_terms(bridge, target, batch, TermWeights(lm=1.0, anchor_mse=1.0, anchor_cos=1.0))
        rows.append({"step": step, "loss": float(sum(t.values()).detach())}
                    | {f"term/{k}": float(v.detach()) for k, v in t.items()})
    found = dead_loss_term(pd.DataFrame(rows))
    assert [f.message.split()[0] for f in found] == ["term/anchor_mse"]


def test_v6_magnitude_shock_reads_as_the_rms_ratio() -> None:
    """V6 fed the resampler's LN output (std ~1) to the target at ~33x its embedding scale."""
    bridge, target, batch = parts("none", tgt_std=1.0)  # recoloured to std 1, not the target's
    s = bridge(batch.h, batch.pad)
    emb = target.tok.weight
    ratio = rms_ratio(s, emb)
    assert ratio > 10
    (finding,) = magnitude_mismatch({"bridge->target": (float(s.pow(2).mean().sqrt()),
                                                         float(emb.pow(2).mean().sqrt()))})
    assert finding.severity.name == "ERROR"
    healthy, _, _ = parts("rms", init_scale=1.0)
    s = healthy(batch.h, batch.pad)
    assert rms_ratio(s, emb) == pytest.approx(1.0, rel=1e-4)
    assert magnitude_mismatch({"bridge->target": (float(s.pow(2).mean().sqrt()),
                                                  float(emb.pow(2).mean().sqrt()))}) == []


def test_v15h_tanh_saturation_from_a_hot_pre_output() -> None:
    bridge, _, batch = parts("tanh")
    assert tanh_saturation(bridge.pre_output(batch.h, batch.pad).detach().numpy()) == []
    with torch.no_grad():
        bridge.resampler.ln_out.weight.fill_(14.0)  # the log's pre-tanh std 14
    (finding,) = tanh_saturation(bridge.pre_output(batch.h, batch.pad).detach().numpy())
    assert finding.severity.name == "ERROR"


def test_fsq_codebook_collapse_when_the_projection_dies() -> None:
    bridge, _, batch = parts("fsq", fsq_levels=(5, 5, 5))
    h = torch.randn(64, 7, SRC)
    pad = torch.zeros(64, 7, dtype=torch.bool)
    live = bridge.codes(bridge.pre_output(h, pad)).numpy()
    assert codebook_collapse(live, 125) == []
    with torch.no_grad():
        bridge.down.weight.zero_()
        bridge.down.bias.zero_()
    (finding,) = codebook_collapse(bridge.codes(bridge.pre_output(h, pad)).numpy(), 125)
    assert "perplexity 1.0" in finding.message


def test_posterior_collapse_on_a_constant_bridge_not_on_the_text_itself() -> None:
    """Soft tokens that do not depend on the input (the batch's mean, as a collapsed bridge
    emits) leave the target's loss unchanged when shuffled across the batch; the question's own
    token embeddings used as soft tokens (what a perfect bridge would emit) do not."""
    problems = generate(40, seed=0)
    _, codec = build_codecs(problems)
    torch.manual_seed(0)
    target = TransformerLM(TransformerShape(codec.vocab_size, 64, 32, 4, 1))
    opt = torch.optim.AdamW(target.parameters(), lr=3e-3)
    texts = [codec.encode(target_text(p)) for p in problems]
    n = min(len(t) for t in texts)
    ids = torch.tensor([t[:n] for t in texts])
    for _ in range(150):  # memorise the 40 problems: their answers depend on the question
        loss = torch.nn.functional.cross_entropy(target(ids[:, :-1]).flatten(0, 1),
                                                 ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    target.requires_grad_(False)
    cut = n - 8  # question part as the "soft tokens", the rest as the suffix
    suffix, labels = ids[:, cut:], ids[:, cut:].clone()
    with torch.no_grad():
        oracle = target.tok(ids[:, :cut])
        matched = float(soft_prompt_loss(target, oracle, suffix, labels))
        shuffled = float(soft_prompt_loss(target, oracle.roll(1, 0), suffix, labels))
        const = oracle.mean(0, keepdim=True).expand_as(oracle)
        c_matched = float(soft_prompt_loss(target, const, suffix, labels))
        c_shuffled = float(soft_prompt_loss(target, const.roll(1, 0), suffix, labels))
    assert posterior_collapse(matched, shuffled) == []
    (finding,) = posterior_collapse(c_matched, c_shuffled)
    assert "ignores" in finding.message
    assert PRIMER in target_text(problems[0])
