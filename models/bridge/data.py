"""The bridge study's prepared data: the corpus split, the two codecs and the two frozen LMs.

``prepare`` is the DAG's ``pretrain_bridge`` stage (``python -m stages.pretrain``): it
generates the corpus from ``task.corpus``, pretrains the source and the target on its training
split and measures the text baseline (the target reading the question) on the validation split.
A target that cannot answer from text leaves nothing a bridge could be measured against (log
004's Mistral scored 0 there), so below ``task.min_text_accuracy`` the stage stops with an error
instead of writing the LMs. Problems and codecs are pure functions of the task config and are
rebuilt on load; only the LMs' weights are stored (``lms.pt``), with ``meta.json`` naming the
task they were made for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import io
from models.bridge.corpus import Problem, generate, split
from models.bridge.lms import build_codecs, pretrain, source_text, target_text, text_answers
from models.bridge.metrics import answer_accuracy
from models.config import fingerprint
from models.config.bridge import BridgeLMConfig, BridgeTaskConfig
from models.data.tokens import CharCodec, WordCodec
from models.errors import DataError
from models.nets.transformer import TransformerLM, TransformerShape

FILES = ("lms.pt", "meta.json")


class BridgeDataError(DataError):
    """The prepared bridge data are missing, stale or unusable (a one-line message)."""


@dataclass(frozen=True)
class Corpus:
    train: list[Problem]
    val: list[Problem]
    test: list[Problem]
    src_codec: CharCodec
    tgt_codec: WordCodec


@dataclass(frozen=True)
class BridgeData:
    """The corpus and the two LMs, frozen (no gradients, eval mode) on the run's device."""

    corpus: Corpus
    source: TransformerLM
    target: TransformerLM
    meta: dict[str, Any]


def corpus(task: BridgeTaskConfig) -> Corpus:
    c = task.corpus
    train, val, test = split(generate(c.problems, c.seed), c.n_val, c.n_test)
    src, tgt = build_codecs(train)
    return Corpus(train, val, test, src, tgt)


def _shape(cfg: BridgeLMConfig, vocab: int) -> TransformerShape:
    return TransformerShape(vocab, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_layer)


def prepare(task: BridgeTaskConfig, out: Path, device: torch.device) -> dict[str, Any]:
    """Pretrain both LMs, check the text baseline, write ``out/lms.pt`` and ``out/meta.json``
    atomically (nothing is written when the check fails). Returns the meta."""
    data = corpus(task)
    source, src_losses = pretrain(task.source, data.src_codec,
                                  [source_text(p) for p in data.train], task.seed, device)
    target, tgt_losses = pretrain(task.target, data.tgt_codec,
                                  [target_text(p) for p in data.train], task.seed + 1, device)
    text_val = answer_accuracy(text_answers(target, data.tgt_codec, data.val, device), data.val)
    if text_val < task.min_text_accuracy:
        raise BridgeDataError(
            f"studies.bridge.task: the pretrained target answers {text_val:.1%} of the "
            f"validation problems from text, under min_text_accuracy "
            f"{task.min_text_accuracy:.0%}; raise task.target.train.steps (now "
            f"{task.target.train.steps}) or its width, or lower min_text_accuracy")
    meta = {"task": fingerprint(task.model_dump()), "text_val_accuracy": text_val,
            "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test),
            "source_vocab": data.src_codec.vocab_size, "target_vocab": data.tgt_codec.vocab_size,
            "source_final_loss": sum(src_losses[-20:]) / len(src_losses[-20:]),
            "target_final_loss": sum(tgt_losses[-20:]) / len(tgt_losses[-20:])}
    io.torch_save(out / "lms.pt", {"source": source.state_dict(), "target": target.state_dict()})
    io.write_json(out / "meta.json", meta)
    return meta


def load(root: Path, task: BridgeTaskConfig, device: torch.device) -> BridgeData:
    """The prepared data under ``root`` (``data/bridge``), checked against ``task``."""
    meta_file, lms_file = root / "meta.json", root / "lms.pt"
    for f in (meta_file, lms_file):
        if not f.is_file():
            raise BridgeDataError(f"{f} not found: run `python -m stages.pretrain` "
                                  "first (or `snakemake ... report`, which does)")
    meta = io.read_json(meta_file)
    if meta.get("task") != fingerprint(task.model_dump()):
        raise BridgeDataError(f"{root} was prepared for other studies.bridge.task params: run "
                              "`python -m stages.pretrain` again")
    data = corpus(task)
    state = torch.load(lms_file, map_location=device, weights_only=True)
    lms = []
    for cfg, vocab, key in ((task.source, data.src_codec.vocab_size, "source"),
                            (task.target, data.tgt_codec.vocab_size, "target")):
        lm = TransformerLM(_shape(cfg, vocab)).to(device)
        lm.load_state_dict(state[key])
        lms.append(lm.eval().requires_grad_(False))
    return BridgeData(data, lms[0], lms[1], meta)
