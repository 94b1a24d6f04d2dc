"""Params of the ``bridge`` study (METHODS §4, log 004): a latent bridge from a frozen source LM's
hidden states to K soft tokens that a frozen target LM answers from.

``task`` is what every row shares and what the pretrain stage builds (``stages.pretrain``:
the generated word-problem corpus and the two LMs pretrained on it. A row is one of
log 004's variants, as settings of the same parts (``models.bridge``): the output map, the
normaliser, the loss terms and their weights, and what the target reconstructs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from models.config.base import Strict
from models.config.rows import RowStudyConfig
from models.config.train import TrainConfig


class CorpusConfig(Strict):
    """The generated word problems (``models.bridge.corpus``): ``problems`` drawn from ``seed``;
    the last ``n_test`` are the test set, the ``n_val`` before them the validation set."""

    problems: Annotated[int, Field(ge=100)] = 4000
    seed: int = 0
    n_val: Annotated[int, Field(ge=20)] = 200
    n_test: Annotated[int, Field(ge=20)] = 200

    @model_validator(mode="after")
    def _fits(self) -> CorpusConfig:
        if self.n_val + self.n_test >= self.problems:
            raise ValueError(f"n_val + n_test = {self.n_val + self.n_test} leaves no training "
                             f"problems of {self.problems}")
        return self


class BridgeLMConfig(Strict):
    """One of the two LMs: its shape and its pretraining (plain backprop, ``models.bridge.lms``).
    ``block_size`` must hold the longest training text (characters for the source, words for the
    target)."""

    n_embd: Annotated[int, Field(gt=0)] = 64
    n_head: Annotated[int, Field(gt=0)] = 4
    n_layer: Annotated[int, Field(gt=0)] = 2
    block_size: Annotated[int, Field(gt=0)] = 64
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _heads(self) -> BridgeLMConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        return self


def _lm(n_embd: int, block: int, steps: int) -> BridgeLMConfig:
    return BridgeLMConfig(n_embd=n_embd, block_size=block, train=TrainConfig(
        steps=steps, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=50, decay_steps=steps))


class BridgeTaskConfig(Strict):
    """The corpus, the two frozen LMs and what the bridge reads.

    ``source`` reads ``Question: <q>`` by characters, ``target`` reads and answers it by words
    (different tokenizers and widths, as log 004's Llama -> Mistral). ``layer``: the source's
    residual stream after that many blocks (0 = its embeddings; log 004 read Llama's layer 16 of
    32, the middle). ``min_text_accuracy``: the prepare stage stops with an error when the
    target, reading the question as text, answers fewer of the validation problems (a bridge is
    only measurable against a target that can answer at all; log 004's Mistral scored 0 there).
    """

    corpus: CorpusConfig = CorpusConfig()
    source: BridgeLMConfig = _lm(48, 128, 600)
    target: BridgeLMConfig = _lm(64, 48, 1200)
    layer: Annotated[int, Field(ge=0)] = 1
    seed: int = 0
    min_text_accuracy: Annotated[float, Field(ge=0, le=1)] = 0.8

    @model_validator(mode="after")
    def _layer(self) -> BridgeTaskConfig:
        if self.layer > self.source.n_layer:
            raise ValueError(f"layer={self.layer} is past the source's last block "
                             f"(source.n_layer={self.source.n_layer}; 0 = its embeddings)")
        return self


class BridgeModelConfig(Strict):
    """The bridge's resampler: ``k`` soft tokens from ``k`` learned queries, ``depth`` layers of
    cross-attention to the source states, self-attention and FFN, ``n_head`` heads, at the
    target's width."""

    k: Annotated[int, Field(gt=0)] = 8
    depth: Annotated[int, Field(gt=0)] = 2
    n_head: Annotated[int, Field(gt=0)] = 4


class TermWeights(Strict):
    """Weights of the loss terms (0 = off; ``models.bridge.terms``): log 004's variants are
    settings of these. ``lm``: the frozen target's CE of the answer after [soft tokens, primer];
    ``recon`` V1's mean-pooled cosine reconstruction of the source; ``contrastive`` V2's InfoNCE
    over the batch; ``anchor_cos`` / ``anchor_mse`` V3/V7's pull towards the answer's token
    embeddings (MSE: the 10x scale mismatch that printed 0.0000); ``batch_div`` V15h's
    batch-diversity (mean off-diagonal cosine); ``unique_div`` V15f's unique-code ratio through a
    float (no gradient path: the log's dead diversity loss, kept to show the detector)."""

    lm: Annotated[float, Field(ge=0)] = 1.0
    recon: Annotated[float, Field(ge=0)] = 0.0
    contrastive: Annotated[float, Field(ge=0)] = 0.0
    anchor_cos: Annotated[float, Field(ge=0)] = 0.0
    anchor_mse: Annotated[float, Field(ge=0)] = 0.0
    batch_div: Annotated[float, Field(ge=0)] = 0.0
    unique_div: Annotated[float, Field(ge=0)] = 0.0


class BridgeRule(Strict):
    """One bridge variant (``models.studies.bridge``). ``output``: none (V1/V2: the resampler's
    LN output recoloured with the target embeddings' statistics), tanh (V3/V7: tanh x a learnable
    scale from ``init_scale`` x the target RMS), rms (V15h: RMS-normalised x scale), fsq (a
    discrete bottleneck of ``fsq_levels``, straight-through). ``learnable_norm``: the
    normaliser's statistics train (V3+). ``autoencode``: the target reconstructs the question
    before answering (V10). ``primer``: what follows the soft tokens in training;
    ``eval_primer`` (default: the same) in evaluation (log 004's train/eval prompt mismatch)."""

    kind: Literal["bridge"] = "bridge"
    output: Literal["none", "tanh", "rms", "fsq"] = "none"
    init_scale: Annotated[float, Field(gt=0)] = 1.0
    learnable_norm: bool = False
    fsq_levels: tuple[int, ...] = (5, 5, 5, 5)
    autoencode: bool = False
    terms: TermWeights = TermWeights()
    primer: str = "Answer:"
    eval_primer: str | None = None
    train: dict[str, Any] = {}
    model: dict[str, Any] = {}

    @model_validator(mode="after")
    def _valid(self) -> BridgeRule:
        if self.output == "fsq" and (not self.fsq_levels
                                     or any(v < 3 or v % 2 == 0 for v in self.fsq_levels)):
            raise ValueError(f"fsq_levels must be odd integers >= 3 (got {self.fsq_levels})")
        if self.terms.unique_div and self.output != "fsq":
            raise ValueError("terms.unique_div counts FSQ codes: it needs output: fsq")
        if not any(self.terms.model_dump().values()):
            raise ValueError("terms: every weight is 0; at least one loss term must be on")
        return self


class BridgeStudyConfig(RowStudyConfig):
    """``bridge``: log 004's latent bridge between two LMs the pipeline pretrains itself."""

    task: BridgeTaskConfig = BridgeTaskConfig()
    model: BridgeModelConfig = BridgeModelConfig()
    rules: dict[str, BridgeRule]

    @model_validator(mode="after")
    def _rows_known(self) -> BridgeStudyConfig:
        self._check()
        for name in self.rules:
            if self.task.target.n_embd % self.row_model(name).n_head:
                raise ValueError(f"rules.{name}: the bridge works at the target's width "
                                 f"{self.task.target.n_embd}, not a multiple of model.n_head")
        return self
