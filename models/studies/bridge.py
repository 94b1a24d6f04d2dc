"""The ``bridge`` study (METHODS §4, log 004): K soft tokens from a frozen source LM's hidden
states that a frozen target LM answers the source's question from, instead of the question text.

Both LMs are the pipeline's own (``stages.pretrain`` -> ``models.bridge.data``): a character
source and a word target on generated word problems ("Mara has 7 lanterns and gives 3 to Ilya.
How many lanterns does Mara have?" -> "4 . Mara has 4 lanterns"). A row is one of log 004's
variants as settings of the same parts (``BridgeRule``: output map, normaliser, loss terms);
only the bridge trains, by backprop through the frozen target (``SoftPromptBP``).

Calibration measures the normaliser's statistics (source states at ``task.layer``, target
embeddings) and the baselines every row is judged against on the test problems: the text
baseline (the target reads the question: the ceiling), primer only (no soft tokens), and the
mismatched-pair level of entity transfer (outputs scored against another problem's question).
Diagnosis adds each run's batch-shuffled baseline (every problem gets another problem's soft
tokens) and the quantities log 004's failures show in: output diversity, batch similarity,
soft-token RMS against the target embeddings', the LM loss with matched vs shuffled soft
tokens, every term's gradient norm, pre-tanh magnitudes and FSQ code usage, empty generations
and the train/eval primer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from models.bridge import metrics as bm
from models.bridge.bridge import Bridge, BridgeShape
from models.bridge.corpus import CATEGORIES, Problem
from models.bridge.data import BridgeData, load
from models.bridge.lms import text_answers
from models.bridge.step import Batch, bridged_answers, loss_terms, make_batch, source_states, total
from models.config import Params
from models.config.bridge import BridgeRule, BridgeStudyConfig, TermWeights
from models.context import RunContext
from models.health.recorders import term_grad_norm
from models.pipeline import RunSpec
from models.studies.base import NO_RECORD, RunRecord
from models.training.trainer import Grads, LearningRule, Stats, Trainer

STAT_PROBLEMS = 512  # training questions the normaliser's statistics are measured on


class BridgeNet(nn.Module):
    """What a bridge row trains: the bridge, and V1's reconstruction head (soft tokens -> the
    source's whitened space) when its ``recon`` term is on."""

    def __init__(self, bridge: Bridge, recon: bool) -> None:
        super().__init__()
        self.bridge = bridge
        shape = bridge.shape
        self.recon = nn.Linear(shape.tgt_dim, shape.src_dim) if recon else None


class ProblemBatches:
    """Random training problems (with replacement, a private generator: the state) made into
    bridge batches by ``make``."""

    def __init__(self, problems: Sequence[Problem], batch_size: int, seed: int,
                 make: Callable[[Sequence[Problem]], Batch]) -> None:
        self.problems, self.batch_size, self.make = problems, batch_size, make
        self.gen = torch.Generator().manual_seed(seed)

    def next(self, step: int = 0) -> Batch:
        pick = torch.randint(len(self.problems), (self.batch_size,), generator=self.gen)
        return self.make([self.problems[i] for i in pick.tolist()])

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])


class SoftPromptBP(LearningRule):
    """Backprop of the row's weighted loss terms through the frozen target into the bridge.
    Every term's value is logged each step (``term/<name>``, unweighted) with the norm of its
    weighted gradient (``termgrad/<name>``): a term that is
    ~0 next to the LM term, or has no path to the bridge, is what log 004 trained with unseen."""

    def __init__(self, target: nn.Module, weights: TermWeights) -> None:
        self.target, self.w = target, weights

    def grads(self, model: nn.Module, batch: Batch, step: int) -> tuple[Grads, Stats]:
        assert isinstance(model, BridgeNet)
        values = loss_terms(model.bridge, self.target, batch, self.w, model.recon)  # type: ignore[arg-type]
        loss = total(values, self.w)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        stats = {"loss": float(loss.detach()),
                 **{f"term/{k}": float(v.detach()) for k, v in values.items()}}
        for k, v in values.items():  # every step: a logged step must never miss them
            stats[f"termgrad/{k}"] = term_grad_norm(getattr(self.w, k) * v, params).norm
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return {n: g for (n, _), g in zip(named, grads, strict=True) if g is not None}, stats


def normaliser_stats(data: BridgeData, layer: int, device: torch.device) -> dict[str, Any]:
    """Per-dimension mean/std of the source states at ``layer`` over real (unpadded) positions
    of training questions, and of the target's token embeddings, with their RMS (log 004's
    StatisticalNormalizer; the RMS ratio is what V6 got wrong by 33x)."""
    c = data.corpus
    h, pad = source_states(data.source, c.src_codec, c.train[:STAT_PROBLEMS], layer, device)
    real = h[~pad]
    emb = data.target.tok.weight.detach()
    return {"src_mean": real.mean(0).tolist(), "src_std": real.std(0).clamp_min(1e-6).tolist(),
            "tgt_mean": emb.mean(0).tolist(), "tgt_std": emb.std(0).clamp_min(1e-6).tolist(),
            "tgt_rms": bm.rms(emb), "src_rms": bm.rms(real)}


def _se(p: float, n: int) -> float:
    """SE of a share over n problems, floored at one problem's worth (so a baseline at 0 is
    'beaten' by more than a lucky answer or two, not by any)."""
    return math.sqrt(max(p * (1 - p), 1.0 / n) / n)


def _baseline(name: str, metric: str, value: float, se: float, label: str, *,
              judged: bool = True, what: str = "") -> dict[str, Any]:
    return {"name": name, "metric": metric, "value": value, "se": se, "higher_is_better": True,
            "must_beat": True, "judged": judged, "table": True, "label": label, "what": what}


class BridgeStudy:
    name = "bridge"
    title = ("bridge: a latent bridge from a frozen character LM's states to soft tokens a "
             "frozen word LM answers from (log 004)")
    columns = (("test_accuracy", "answer accuracy"),
               ("test_accuracy_shuffled", "acc. (shuffled soft tokens)"),
               ("entity_transfer", "entity transfer"),
               ("entity_transfer_mismatched", "transfer (mismatched pairs)"),
               ("lm_gain", "LM gain from soft tokens (nats)"),
               ("diversity", "output diversity"), ("batch_similarity", "batch similarity"),
               ("rms_ratio", "RMS ratio"), ("val_loss", "val LM loss"))
    plots = (("val_accuracy", "held-out answer accuracy"),
             ("val_rms_ratio", "soft-token RMS / target-embedding RMS"),
             ("val_diversity", "output diversity (unique outputs / N)"),
             ("loss", "training loss"))
    samples_title = "Samples (seed {seed}, greedy; test problems)"

    # ------------------------------------------------------------------ setup
    def _setup(self, params: Params, row: str, ctx: RunContext,
               ) -> tuple[BridgeStudyConfig, BridgeRule, BridgeData]:
        cfg = params.study_as(self.name, BridgeStudyConfig)
        return cfg, cfg.row_rule(row), load(ctx.bridge_dir, cfg.task, ctx.device)

    @staticmethod
    def _maker(cfg: BridgeStudyConfig, rule: BridgeRule, data: BridgeData, device: torch.device,
               primer: str) -> Callable[[Sequence[Problem]], Batch]:
        c = data.corpus
        return lambda problems: make_batch(problems, data.source, c.src_codec, c.tgt_codec,
                                           cfg.task.layer, rule.autoencode, device, primer)

    # ------------------------------------------------------------------ stages
    def calibrate(self, params: Params, row: str, ctx: RunContext) -> dict[str, Any]:
        cfg, rule, data = self._setup(params, row, ctx)
        c, n = data.corpus, len(data.corpus.test)
        stats = normaliser_stats(data, cfg.task.layer, ctx.device)
        text = text_answers(data.target, c.tgt_codec, c.test, ctx.device, rule.primer)
        batch = self._maker(cfg, rule, data, ctx.device, rule.primer)(c.test)
        primer_only = bridged_answers(None, data.target, c.tgt_codec, batch, c.test,
                                      primer=rule.primer)
        refs = {"text": (bm.answer_accuracy(text, c.test), bm.entity_transfer(text, c.test)),
                "primer": (bm.answer_accuracy(primer_only, c.test),
                           bm.entity_transfer(primer_only, c.test))}
        mismatched = bm.mismatched_transfer(text, c.test)["all"]
        (t_acc, t_tr), (p_acc, p_tr) = refs["text"], refs["primer"]
        baselines = [
            _baseline("text", "test_accuracy", t_acc, _se(t_acc, n), "text (the target reads "
                      "the question: the ceiling)", judged=False),
            _baseline("text", "entity_transfer", t_tr["all"].rate, t_tr["all"].se,
                      "text (the target reads the question: the ceiling)", judged=False),
            _baseline("primer_only", "test_accuracy", p_acc, _se(p_acc, n),
                      "primer only (no soft tokens)", what="the target after the primer alone"),
            _baseline("primer_only", "entity_transfer", p_tr["all"].rate, p_tr["all"].se,
                      "primer only (no soft tokens)", what="the target after the primer alone"),
            _baseline("mismatched", "entity_transfer", mismatched.rate, mismatched.se,
                      "mismatched question/output pairs (chance transfer)",
                      what="text outputs scored against another problem's question"),
        ]
        return {"stats": stats, "rms_ratio_source_target": stats["src_rms"] / stats["tgt_rms"],
                "text_accuracy": t_acc, "primer_accuracy": p_acc,
                "text_transfer": t_tr["all"].rate, "primer_transfer": p_tr["all"].rate,
                "mismatched_transfer": mismatched.rate, "mismatched_transfer_se": mismatched.se,
                "data": data.meta,
                "health": {"baselines": baselines, "vocab_size": c.tgt_codec.vocab_size}}

    def _net(self, cfg: BridgeStudyConfig, rule: BridgeRule, row: str,
             calibration: dict[str, Any], seed: int, device: torch.device) -> BridgeNet:
        m = cfg.row_model(row)
        shape = BridgeShape(src_dim=cfg.task.source.n_embd, tgt_dim=cfg.task.target.n_embd,
                            k=m.k, depth=m.depth, n_head=m.n_head, output=rule.output,
                            init_scale=rule.init_scale, learnable_norm=rule.learnable_norm,
                            fsq_levels=rule.fsq_levels)
        stats = {k: torch.tensor(v) for k, v in calibration["stats"].items()}
        torch.manual_seed(seed)
        return BridgeNet(Bridge(shape, stats), recon=rule.terms.recon > 0).to(device)

    def build_trainer(self, params: Params, spec: RunSpec, calibration: dict[str, Any],
                      ctx: RunContext) -> Trainer:
        cfg, rule, data = self._setup(params, spec.row, ctx)
        train = cfg.row_train(spec.row)
        net = self._net(cfg, rule, spec.row, calibration, spec.seed, ctx.device)
        make = self._maker(cfg, rule, data, ctx.device, rule.primer)
        batches = ProblemBatches(data.corpus.train, train.batch_size, spec.seed, make)
        val = data.corpus.val
        val_batch = make(val)
        eval_primer = rule.eval_primer or rule.primer
        eval_batch = self._maker(cfg, rule, data, ctx.device, eval_primer)(val)

        def evaluate(model: nn.Module) -> Stats:
            assert isinstance(model, BridgeNet)
            with torch.no_grad():
                lm = loss_terms(model.bridge, data.target, val_batch, TermWeights())["lm"]
                outs = bridged_answers(model.bridge, data.target, data.corpus.tgt_codec,
                                       eval_batch, val, primer=eval_primer)
                soft = model.bridge(val_batch.h, val_batch.pad)
            return {"val_loss": float(lm), "val_accuracy": bm.answer_accuracy(outs, val),
                    "val_diversity": bm.output_diversity(outs),
                    "val_rms_ratio": bm.rms_ratio(soft, data.target.tok.weight),
                    "val_batch_similarity": bm.batch_similarity(soft)}

        rule_impl = SoftPromptBP(data.target, rule.terms)
        return Trainer(net, rule_impl, batches, evaluate, train)

    def diagnose(self, params: Params, spec: RunSpec, trainer: Trainer, ctx: RunContext,
                 record: RunRecord = NO_RECORD) -> dict[str, Any]:
        """On the test problems: answers with matched and shuffled soft tokens, entity transfer
        against the row's own mismatched-pair level, and what log 004's failures show in."""
        cfg, rule, data = self._setup(params, spec.row, ctx)
        net = trainer.model
        assert isinstance(net, BridgeNet)
        c, test, cal = data.corpus, data.corpus.test, record.calibration
        eval_primer = rule.eval_primer or rule.primer
        batch = self._maker(cfg, rule, data, ctx.device, rule.primer)(test)
        eval_batch = self._maker(cfg, rule, data, ctx.device, eval_primer)(test)
        outs = bridged_answers(net.bridge, data.target, c.tgt_codec, eval_batch, test,
                               primer=eval_primer)
        shuffled = bridged_answers(net.bridge, data.target, c.tgt_codec, eval_batch, test,
                                   shuffle=1, primer=eval_primer)
        tr, mis = bm.entity_transfer(outs, test), bm.mismatched_transfer(outs, test)["all"]
        values = loss_terms(net.bridge, data.target, batch, rule.terms, net.recon)  # type: ignore[arg-type]
        params_ = [p for p in net.parameters() if p.requires_grad]
        grads = {k: term_grad_norm(getattr(rule.terms, k) * v, params_) for k, v in values.items()}
        with torch.no_grad():
            pre = net.bridge.pre_output(batch.h, batch.pad)
            soft = net.bridge.output_map(pre)
            lm = float(values["lm"]) if "lm" in values else float(
                loss_terms(net.bridge, data.target, batch, TermWeights())["lm"])
            shuffled_batch = Batch(batch.h.roll(-1, 0), batch.pad.roll(-1, 0), batch.suffix,
                                   batch.labels, batch.answer, batch.answer_pad)
            lm_shuffled = float(loss_terms(net.bridge, data.target, shuffled_batch,
                                           TermWeights())["lm"])
        acc, acc_sh, n = bm.answer_accuracy(outs, test), bm.answer_accuracy(shuffled, test), len(test)
        emb = data.target.tok.weight
        metrics: dict[str, Any] = {
            **trainer.evaluate(),
            "test_accuracy": acc, "test_accuracy_shuffled": acc_sh, "n_test": n,
            "entity_transfer": tr["all"].rate, "entity_transfer_se": tr["all"].se,
            **{f"transfer/{k}": tr[k].rate for k in CATEGORIES},
            "entity_transfer_mismatched": mis.rate, "entity_transfer_mismatched_se": mis.se,
            "diversity": bm.output_diversity(outs), "batch_similarity": bm.batch_similarity(soft),
            "rms_ratio": bm.rms_ratio(soft, emb), "lm_matched": lm, "lm_shuffled": lm_shuffled,
            "lm_gain": lm_shuffled - lm,
            **{f"termgrad/{k}": g.norm for k, g in grads.items()},
            **{f"baseline/{k}": cal[k] for k in ("text_accuracy", "primer_accuracy",
                                                  "text_transfer", "primer_transfer",
                                                  "mismatched_transfer") if k in cal},
        }
        extras: dict[str, Any] = {
            "outputs": outs, "generations": outs, "soft_tokens": soft.flatten(1).cpu().numpy(),
            "rms": {"bridge->target embeddings": (bm.rms(soft), bm.rms(emb))},
            "posterior": {"lm_matched": lm, "lm_shuffled": lm_shuffled},
            "prompts": {"train": rule.primer, "eval": eval_primer},
            "no_grad_path": [k for k, g in grads.items() if g.no_grad_path],
            "baselines": [*(cal.get("health") or {}).get("baselines", []),
                          _baseline("shuffled", "test_accuracy", acc_sh, _se(acc_sh, n),
                                    "batch-shuffled soft tokens (this run)",
                                    what="the same run with each problem given another's "
                                    "soft tokens")],
        }
        if rule.output == "tanh":
            extras["pre_tanh"] = pre.abs().flatten().cpu().numpy()
        if rule.output == "fsq":
            extras["codes"] = {"codes": net.bridge.codes(pre).flatten().cpu().numpy(),
                               "codebook_size": int(np.prod(rule.fsq_levels))}
        text = text_answers(data.target, c.tgt_codec, test[:5], ctx.device, rule.primer)
        samples = [f"Q: {p.question} | answer {p.answer} | text baseline: {t!r} | bridge: {o!r}"
                   for p, t, o in zip(test[:5], text, outs[:5], strict=True)]
        return {"metrics": metrics, "extras": extras, "samples": samples}

    # ------------------------------------------------------------------ report
    @staticmethod
    def extra_markdown(frame: pd.DataFrame) -> str:
        """One plain sentence per row: does it beat the primer-only and shuffled baselines on
        accuracy, and its mismatched-pair level on entity transfer (by more than its SE)?"""
        lines = ["### Does a bridge carry the question? (means over seeds)", ""]
        for row, g in frame.groupby("row", sort=False):
            m = g.mean(numeric_only=True)
            bars = {"primer only": m.get("baseline/primer_accuracy", math.nan),
                    "shuffled soft tokens": m["test_accuracy_shuffled"]}
            n = int(m["n_test"])
            beaten = [k for k, v in bars.items() if m["test_accuracy"] > v + 2 * _se(v, n)]
            text = m.get("baseline/text_accuracy", math.nan)
            acc = (f"answer accuracy {m['test_accuracy']:.3f} (text {text:.3f}, primer only "
                   f"{bars['primer only']:.3f}, shuffled {bars['shuffled soft tokens']:.3f}): "
                   + ("beats both" if len(beaten) == 2 else
                      f"beats {beaten[0]} only" if beaten else "beats neither"))
            above = (m["entity_transfer"] - m["entity_transfer_mismatched"]
                     > m["entity_transfer_mismatched_se"])
            transfer = (f"entity transfer {m['entity_transfer']:.3f} vs its mismatched-pair "
                        f"level {m['entity_transfer_mismatched']:.3f} ± "
                        f"{m['entity_transfer_mismatched_se']:.3f}: "
                        + ("above it" if above else "not above it"))
            verdict = "works" if len(beaten) == 2 and above else "does not work"
            lines.append(f"- **{row}** {verdict}: {acc}; {transfer}.")
        return "\n".join(lines)
