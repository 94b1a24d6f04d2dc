"""params.yaml schema of the feed-forward rule studies (``rules_vision``, ``rules_ladder``,
``rules_lq``).

A study lists ``rows`` (names) and ``rules`` keyed by row name; ``kind`` picks the learning rule
and the remaining keys are that rule's hyper-parameters (its class in ``models.config.ff_rules``,
which the library takes as it is).
Training length is given in ``epochs`` over the fit split; ``row_train`` turns it into the
step-based ``TrainConfig`` the segment driver uses (``steps``, ``segment_steps`` and a cosine that
decays over the whole run).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from models.config.base import Strict, StudyConfig, check_rows, merge_checked

# One config class per rule, in its own module of models/config/ff_rules (found by listing it);
# these classes are also what the library takes (models.ff.rules imports them). The rule's seed
# (the run's) and, for the credit bridge, the run's epochs are constructor arguments, not fields.
from models.config.ff_rules import RULE_CONFIGS as RULE_CONFIGS  # re-exported
from models.config.ff_rules import FFRule
from models.config.train import TrainConfig


# ---------------------------------------------------------------- models and tasks
class FFModelConfig(Strict):
    """The deep pre-LN MLP (models.ff.mlp) and, for the EP row, the energy net (models.ff.energy)."""

    width: Annotated[int, Field(gt=0)] = 128
    depth: Annotated[int, Field(gt=0)] = 4
    block_layers: Literal[1, 2] = 2
    d_ff: Annotated[int, Field(gt=0)] | None = None
    act: Literal["gelu", "relu", "tanh", "identity", "sigmoid"] = "gelu"
    layernorm: bool = True
    energy_hidden: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=1)] = [256]
    energy_act: Literal["hardsigmoid", "tanh", "sigmoid"] = "hardsigmoid"
    energy_dt: Annotated[float, Field(gt=0, le=1)] = 0.5
    energy_free_steps: Annotated[int, Field(gt=0)] = 40  # cap on the free phase
    energy_tol: Annotated[float, Field(ge=0)] = 1e-5  # free-phase relative residual to stop at
    # heavy ball (with adaptive restart) of the free phase; models/ff/energy.py says why
    energy_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9


class VisionTaskConfig(Strict):
    """MNIST-1D (data/mnist1d, prepare stage) or a user's CIFAR-10 copy pinned by sha256."""

    dataset: Literal["mnist1d", "cifar10"] = "mnist1d"
    cifar10_path: str | None = None
    cifar10_sha256: str | None = None
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.1  # carved from train, for evaluate

    @model_validator(mode="after")
    def _cifar(self) -> VisionTaskConfig:
        if self.dataset == "cifar10" and not (self.cifar10_path and self.cifar10_sha256):
            raise ValueError("dataset 'cifar10' needs task.cifar10_path and task.cifar10_sha256 "
                             "(a local copy; nothing is downloaded)")
        return self


class LadderModelConfig(Strict):
    """The student of every ladder cell: width d, one-layer phi_a blocks (tasks.ladder)."""

    d: Annotated[int, Field(gt=0)] = 128


class LadderTaskConfig(Strict):
    alphas: Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=1)] = [0.0, 1.0]
    depths: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=1)] = [2, 4]
    n_classes: Annotated[int, Field(gt=1)] = 10
    n_train: Annotated[int, Field(gt=0)] = 4000
    n_test: Annotated[int, Field(gt=0)] = 1000
    gain: Annotated[float, Field(gt=0)] = 2.0
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.1


class LQModelConfig(Strict):
    depth: Annotated[int, Field(gt=0)] = 4
    d: Annotated[int, Field(gt=0)] = 32


class LQTaskConfig(Strict):
    """``system: fixed`` (log 002's toy): the linear system keeps its initial weights and only
    the rules' credit estimators learn, scored against its exact costate. ``co_trained``: the
    rule also trains the system (a different question: once it fits, the costate is noise).
    d_in = d makes the hidden states full rank, so a map's Jacobian is identified by the data."""

    system: Literal["fixed", "co_trained"] = "fixed"
    d_in: Annotated[int, Field(gt=0)] = 32
    d_out: Annotated[int, Field(gt=0)] = 8
    n_train: Annotated[int, Field(gt=0)] = 4096
    n_test: Annotated[int, Field(gt=0)] = 1024
    noise: Annotated[float, Field(ge=0)] = 0.1
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.1


# ---------------------------------------------------------------- studies
class _FFStudyBase(StudyConfig):
    model: Strict  # each study sets its own model class and default
    epochs: Annotated[int, Field(gt=0)] = 20
    segment_epochs: Annotated[int, Field(gt=0)] | None = None  # None: the whole run is one segment
    train: TrainConfig = TrainConfig(batch_size=100, lr=1e-3, min_lr=1e-4, warmup_steps=20,
                                     weight_decay=0.0, log_every=20, eval_every=200,
                                     eval_batches=1)
    rules: dict[str, FFRule]

    forbidden_kinds: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _rows_known(self) -> _FFStudyBase:
        check_rows(self.rows, self.rules)
        for name, rule in self.rules.items():
            if rule.kind in self.forbidden_kinds or (rule.uses_energy_net()
                                                     and "ep" in self.forbidden_kinds):
                raise ValueError(f"rules.{name}: kind {rule.kind!r} is not available in this "
                                 f"study (it needs another network family)")
            merge_checked(self.train, rule.train, f"rules.{name}.train")
            merge_checked(self.model, rule.model, f"rules.{name}.model")
        return self

    @model_validator(mode="after")
    def _no_step_counts(self) -> _FFStudyBase:
        """These studies count training in epochs and ``row_train`` derives the step counts; a
        step count given under ``train`` would be replaced without a word, so it is refused."""
        given = [("train", self.train.model_fields_set),
                 *((f"rules.{n}.train", set(r.train)) for n, r in self.rules.items())]
        for where, keys in given:
            bad = sorted(set(keys) & {"steps", "segment_steps", "decay_steps"})
            if bad:
                raise ValueError(f"{where}.{bad[0]}: the feed-forward studies count training in "
                                 "epochs (steps, segment_steps and decay_steps follow from "
                                 "`epochs` and `segment_epochs`); set those instead")
        return self

    @abstractmethod
    def n_fit(self) -> int:
        """Training examples per epoch (the task's train split minus the validation part)."""

    def steps_per_epoch(self, row: str) -> int:
        bs = merge_checked(self.train, self.rules[row].train, f"rules.{row}.train").batch_size
        return max(1, self.n_fit() // bs)  # drop-last: every epoch has the same steps

    def row_epochs(self, row: str) -> int:
        return self.rules[row].epochs or self.epochs

    def row_train(self, row: str) -> TrainConfig:
        base = merge_checked(self.train, self.rules[row].train, f"rules.{row}.train")
        spe = self.steps_per_epoch(row)
        steps = self.row_epochs(row) * spe
        seg = steps if self.segment_epochs is None else min(steps, self.segment_epochs * spe)
        return TrainConfig.model_validate({**base.model_dump(), "steps": steps,
                                           "segment_steps": seg, "decay_steps": steps})

    def row_model(self, row: str) -> Any:
        return merge_checked(self.model, self.rules[row].model, f"rules.{row}.model")

    def row_rule(self, row: str) -> Any:
        return self.rules[row]


class RulesVisionConfig(_FFStudyBase):
    """MNIST-1D / CIFAR-10 classification with a deep pre-LN MLP; one row per rule."""

    model: FFModelConfig = FFModelConfig()
    task: VisionTaskConfig = VisionTaskConfig()

    def n_fit(self) -> int:
        total = 50000 if self.task.dataset == "cifar10" else 4000
        return total - round(self.task.val_fraction * total)


class RulesLadderConfig(_FFStudyBase):
    """The nonlinearity ladder: every run trains each (a, L) cell of ``task`` in turn."""

    model: LadderModelConfig = LadderModelConfig()
    task: LadderTaskConfig = LadderTaskConfig()
    forbidden_kinds = ("ep",)

    def n_fit(self) -> int:
        return self.task.n_train - round(self.task.val_fraction * self.task.n_train)


class RulesLQConfig(_FFStudyBase):
    """The toy linear-quadratic credit problem (exact costate)."""

    model: LQModelConfig = LQModelConfig()
    task: LQTaskConfig = LQTaskConfig()
    forbidden_kinds = ("ep",)

    def n_fit(self) -> int:
        return self.task.n_train - round(self.task.val_fraction * self.task.n_train)
