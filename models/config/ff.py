"""params.yaml schema of the feed-forward rule studies (``rules_vision``, ``rules_ladder``,
``rules_lq``).

A study lists ``rows`` (names) and ``rules`` keyed by row name; ``kind`` picks the learning rule
and the remaining keys are that rule's hyper-parameters (the ``FF*Rule`` classes below, which the
library takes as they are).
Training length is given in ``epochs`` over the fit split; ``row_train`` turns it into the
step-based ``TrainConfig`` the segment driver uses (``steps``, ``segment_steps`` and a cosine that
decays over the whole run).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from models.config.base import Strict, StudyConfig, check_rows, merge_checked
from models.config.train import TrainConfig


# ---------------------------------------------------------------- rules
# These classes are also what the library takes (models.ff.rules imports them): one class per
# rule, its hyper-parameters, defaults and validators defined here only. The rule's seed (the
# run's) and, for the credit bridge, the run's epochs are constructor arguments, not fields.
class _RuleBase(Strict):
    train: dict[str, Any] = {}  # per-row overrides of the study's train / model
    model: dict[str, Any] = {}
    epochs: Annotated[int, Field(gt=0)] | None = None  # None: the study's epochs (equal budgets)


class FFBPRule(_RuleBase):
    """Back-propagation (models.ff.rules.bp)."""

    kind: Literal["bp"] = "bp"


class FFHeadOnlyRule(_RuleBase):
    """Hidden layers frozen at init, only the readout learns (models.ff.rules.head_only): the
    baseline each rule must beat on its own network family (``energy``: EP's energy net)."""

    kind: Literal["head_only"] = "head_only"
    net: Literal["mlp", "energy"] = "mlp"


class FFDFARule(_RuleBase):
    """Direct feedback alignment (models.ff.rules.dfa)."""

    kind: Literal["dfa"] = "dfa"
    # "calibrated": RMS of the credit matched to BP's dL/dh_l at initialisation (calibrate stage)
    feedback_scale: Annotated[float, Field(gt=0)] | Literal["calibrated"] = "calibrated"
    # shared: one B for the residual stream (Launay et al. 2020); per_layer: B_l per layer
    # (Nokland 2016). models/ff/rules/dfa.py says why shared is the default.
    feedback: Literal["shared", "per_layer"] = "shared"


class FFDTPRule(_RuleBase):
    """Difference target propagation (models.ff.rules.dtp)."""

    kind: Literal["dtp"] = "dtp"
    eta: Annotated[float, Field(gt=0)] = 0.1  # top target step on the per-sample output gradient
    noise_std: Annotated[float, Field(gt=0)] = 0.1  # sigma of the inverse-training perturbation
    inverse_lr: Annotated[float, Field(gt=0)] = 1e-3  # Adam, internal
    inverse_steps: Annotated[int, Field(ge=1)] = 1  # inverse updates per training step
    pretrain_steps: Annotated[int, Field(ge=0)] = 200  # inverse pre-training before step 0


class FFPCRule(_RuleBase):
    """Predictive coding with a clamped output (models.ff.rules.pc, which says why)."""

    kind: Literal["pc"] = "pc"
    settle_lr: Annotated[float, Field(gt=0)] = 0.2  # gamma (over max precision)
    settle_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # heavy ball
    settle_iters: Annotated[int, Field(ge=1)] = 100  # cap
    settle_tol: Annotated[float, Field(gt=0, lt=1)] = 2e-2  # fraction of the initial force left
    precision_init: Annotated[float, Field(gt=0)] = 1.0
    precision_floor: Annotated[float, Field(gt=0)] = 0.1
    precision_lr: Annotated[float, Field(ge=0)] = 1e-2  # SGD on r; 0 freezes the precisions
    precision_prior_rate: Annotated[float, Field(gt=0)] = 0.1  # b: stable point near 1 / (2b)
    precision_damping: Annotated[float, Field(ge=0)] = 1.0  # kappa
    precision_ema: Annotated[float, Field(ge=0, lt=1)] = 0.99
    noise_std: Annotated[float, Field(ge=0)] = 0.0
    noise_anneal: Annotated[float, Field(gt=0, le=1)] = 0.9  # per-epoch factor on the noise
    output_weight: Annotated[float, Field(gt=0, le=1)] = 1.0  # 1 = clamped; < 1 tests only
    calibrate_settle: bool = True  # replace settle_lr by the calibrated one

    @model_validator(mode="after")
    def _floor(self) -> FFPCRule:
        if self.precision_init <= self.precision_floor:
            raise ValueError("precision_init must exceed precision_floor")
        return self


class FFEPRule(_RuleBase):
    """Equilibrium propagation on the energy net (models.ff.rules.ep)."""

    kind: Literal["ep"] = "ep"
    beta: Annotated[float, Field(gt=0)] = 0.5  # centered nudging (Laborieux et al. 2021)
    nudge_steps: Annotated[int, Field(ge=1)] = 20


class FFStateBridgeRule(_RuleBase):
    """State bridge (models.ff.rules.state_bridge)."""

    kind: Literal["state_bridge"] = "state_bridge"
    bridge_lr: Annotated[float, Field(gt=0)] = 1e-3  # Adam, internal


class FFCreditBridgeRule(_RuleBase):
    """Credit bridge (models.ff.rules.credit_bridge)."""

    kind: Literal["credit_bridge"] = "credit_bridge"
    # Adam, internal, value head and bridges: 10x the net's lr so V tracks the moving net
    bridge_lr: Annotated[float, Field(gt=0)] = 1e-2
    d_value: Annotated[int, Field(gt=0)] = 256
    term_grad_weight: Annotated[float, Field(ge=0)] = 1.0
    warmup_frac: Annotated[float, Field(ge=0, le=1)] = 0.2  # DFA warm-up, fraction of epochs
    feedback_scale: Annotated[float, Field(gt=0)] | Literal["calibrated"] = "calibrated"


FFRule = Annotated[FFBPRule | FFHeadOnlyRule | FFDFARule | FFDTPRule | FFPCRule | FFEPRule
                   | FFStateBridgeRule | FFCreditBridgeRule, Field(discriminator="kind")]
RULE_CONFIGS: dict[str, type[_RuleBase]] = {
    c.model_fields["kind"].default: c
    for c in (FFBPRule, FFHeadOnlyRule, FFDFARule, FFDTPRule, FFPCRule, FFEPRule,
              FFStateBridgeRule, FFCreditBridgeRule)}


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
            energy = rule.kind == "ep" or getattr(rule, "net", "mlp") == "energy"
            if rule.kind in self.forbidden_kinds or (energy and "ep" in self.forbidden_kinds):
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
