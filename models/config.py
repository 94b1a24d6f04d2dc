"""params.yaml -> validated config objects.

This is the only place that knows the schema. Every model forbids unknown keys, so a typo in
params.yaml stops the stage with one message that names the key and lists what is allowed.
Profiles (``profiles/<name>.yaml``) are deep-merged over params.yaml when ``BPFREE_PROFILE`` is set.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:  # the real import is at the bottom (config_ff builds on this module)
    from models.config_ff import RulesLadderConfig, RulesLQConfig, RulesVisionConfig

PARAMS_FILE = Path("params.yaml")
PROFILE_ENV = "BPFREE_PROFILE"


class ConfigError(ValueError):
    """A params problem, with a message meant for the person who edited params.yaml."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- data
class TextDataConfig(Strict):
    """The text corpus: generated offline by default, or a user file / URL pinned by sha256."""

    source: Literal["generated", "file", "url"] = "generated"
    path: str | None = None
    url: str | None = None
    sha256: str | None = None
    stories: Annotated[int, Field(gt=0)] = 12000
    seed: int = 1234
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.05

    @model_validator(mode="after")
    def _source_fields(self) -> TextDataConfig:
        if self.source == "file" and not self.path:
            raise ValueError("source 'file' needs data.text.path")
        if self.source == "url" and not self.url:
            raise ValueError("source 'url' needs data.text.url")
        if self.source in ("file", "url") and not self.sha256:
            raise ValueError(f"source '{self.source}' needs data.text.sha256 (64 hex digits)")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return self


class TokenizerConfig(Strict):
    kind: Literal["bpe", "char"] = "bpe"
    vocab_size: Annotated[int, Field(ge=260, le=65535)] = 512


class Mnist1DDataConfig(Strict):
    """MNIST-1D, generated offline by the ``mnist1d`` package (4/5 train, 1/5 test)."""

    num_samples: Annotated[int, Field(ge=100)] = 5000
    seed: int = 42


class DataConfig(Strict):
    text: TextDataConfig = TextDataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    mnist1d: Mnist1DDataConfig = Mnist1DDataConfig()


# ---------------------------------------------------------------- training
class TrainConfig(Strict):
    """Optimisation and bookkeeping of one run. The LR schedule never depends on ``steps``, so
    raising ``steps`` extends a run without invalidating the segments already trained."""

    batch_size: Annotated[int, Field(gt=0)] = 32
    steps: Annotated[int, Field(gt=0)] = 800
    segment_steps: Annotated[int, Field(gt=0)] = 200
    lr: Annotated[float, Field(gt=0)] = 3e-3
    min_lr: Annotated[float, Field(ge=0)] = 3e-4
    warmup_steps: Annotated[int, Field(ge=0)] = 50
    decay_steps: Annotated[int, Field(gt=0)] = 800
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    log_every: Annotated[int, Field(gt=0)] = 20
    eval_every: Annotated[int, Field(gt=0)] = 200
    eval_batches: Annotated[int, Field(gt=0)] = 16
    live_guard: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} must not exceed lr={self.lr}")
        return self

    @property
    def n_segments(self) -> int:
        return -(-self.steps // self.segment_steps)

    def segment_end(self, index: int) -> int:
        return min((index + 1) * self.segment_steps, self.steps)


class LMModelConfig(Strict):
    n_embd: Annotated[int, Field(gt=0)] = 64
    n_head: Annotated[int, Field(gt=0)] = 4
    n_layer: Annotated[int, Field(gt=0)] = 1
    block_size: Annotated[int, Field(gt=1)] = 64
    qk_norm: bool = False

    @model_validator(mode="after")
    def _heads(self) -> LMModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        return self


class BPRule(Strict):
    """Backprop through a standard pre-LN transformer (the baseline row)."""

    kind: Literal["bp"] = "bp"
    train: dict[str, Any] = {}
    model: dict[str, Any] = {}


class RelaxParams(Strict):
    """Free phase of the equilibrium block (models.eqt.relax.RelaxConfig; log 003's recipe)."""

    eps: Annotated[float, Field(gt=0, le=1)] = 0.1
    t1: Annotated[int, Field(ge=1)] = 150
    t1max: Annotated[int, Field(ge=1)] = 300
    res_target: Annotated[float, Field(gt=0, lt=1)] = 1e-4
    chunk: Annotated[int, Field(ge=1)] = 10

    @model_validator(mode="after")
    def _order(self) -> RelaxParams:
        if self.t1max < self.t1:
            raise ValueError(f"t1max={self.t1max} must be >= t1={self.t1}")
        return self


class StabParams(Strict):
    """Stabilisers (models.eqt.stabilisers). With ``controller`` on, lambda starts at ``lam`` and
    follows the residual, clipped to [floor, lam_max]; the floor must stay > 0 (log 003: two
    lambda -> 0 runs exploded while res read 0). With it off, ``jacreg`` is a fixed lambda."""

    controller: bool = True
    lam: Annotated[float, Field(gt=0)] = 0.1
    floor: Annotated[float, Field(gt=0)] = 0.1
    lam_max: Annotated[float, Field(gt=0)] = 16.0
    target: Annotated[float, Field(gt=0)] = 1.5e-3
    ema: Annotated[float, Field(ge=0, lt=1)] = 0.9
    power: Annotated[float, Field(gt=0)] = 0.3
    jacreg: Annotated[float, Field(ge=0)] = 0.0
    resreg: Annotated[float, Field(ge=0)] = 0.0
    gate: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _range(self) -> StabParams:
        if not self.floor <= self.lam_max:
            raise ValueError(f"floor={self.floor} must not exceed lam_max={self.lam_max}")
        return self


class EqBlockParams(Strict):
    """The equilibrium block and its initialisation (models.eqt.model.EqShape)."""

    kind: Literal["thick", "conservative"] = "thick"
    damping: Annotated[float, Field(ge=0)] = 1.0
    emb_std: Annotated[float, Field(gt=0)] = 1.0
    init_std: Annotated[float, Field(gt=0)] = 0.02
    resinit: Annotated[float, Field(gt=0)] = 1.0


class NudgeParams(Strict):
    """The EP estimator (models.eqt.ep.EPConfig): centered +-beta nudging for T2 steps, or N
    holomorphic points of radius r; AEP correction none | fixed | tracking."""

    beta: Annotated[float, Field(gt=0)] = 0.02
    t2: Annotated[int, Field(ge=1)] = 20
    aep: Literal["none", "fixed", "tracking"] = "tracking"
    holomorphic_n: Annotated[int, Field(ge=0)] = 0
    holomorphic_r: Annotated[float, Field(gt=0)] = 0.02
    adaptive_t2: bool = False
    t2_max: Annotated[int, Field(ge=1)] = 80
    snapshot_every: Annotated[int, Field(ge=1)] = 4

    @model_validator(mode="after")
    def _holo(self) -> NudgeParams:
        if self.holomorphic_n == 1:
            raise ValueError("holomorphic_n=1 has no centered contrast; use 0 (real +-beta) or >= 2")
        if self.adaptive_t2 and self.t2_max < 2 * self.snapshot_every:
            raise ValueError(f"adaptive_t2 needs t2_max >= 2 * snapshot_every (got t2_max="
                             f"{self.t2_max}, snapshot_every={self.snapshot_every})")
        return self


class BPTTRule(Strict):
    """Backprop through the T1-step unroll of the equilibrium block (the exact-gradient control)."""

    kind: Literal["bptt"] = "bptt"
    train: dict[str, Any] = {}
    model: dict[str, Any] = {}
    block: EqBlockParams = EqBlockParams()
    relax: RelaxParams = RelaxParams()
    stab: StabParams = StabParams()


class EPRule(Strict):
    """Equilibrium propagation on the equilibrium block. ``cos_every``: steps between training-time
    measurements of cos(g_EP, g_BPTT) on the training batch (0 = off; each costs one EP and one
    BPTT gradient)."""

    kind: Literal["ep"] = "ep"
    train: dict[str, Any] = {}
    model: dict[str, Any] = {}
    block: EqBlockParams = EqBlockParams()
    relax: RelaxParams = RelaxParams()
    stab: StabParams = StabParams()
    nudge: NudgeParams = NudgeParams()
    cos_every: Annotated[int, Field(ge=0)] = 0


LMRule = Annotated[BPRule | BPTTRule | EPRule, Field(discriminator="kind")]


class LMStudyConfig(Strict):
    """A language-modelling study: rows are learning rules, each trained on every seed."""

    rows: list[str]
    model: LMModelConfig = LMModelConfig()
    train: TrainConfig = TrainConfig()
    rules: dict[str, LMRule]

    @model_validator(mode="after")
    def _rows_known(self) -> LMStudyConfig:
        unknown = [r for r in self.rows if r not in self.rules]
        if unknown:
            raise ValueError(f"rows {unknown} are not defined under rules (defined: "
                             f"{sorted(self.rules)})")
        if len(set(self.rows)) != len(self.rows):
            raise ValueError("rows must not repeat")
        for name, rule in self.rules.items():
            _merge_checked(self.train, rule.train, f"rules.{name}.train")
            _merge_checked(self.model, rule.model, f"rules.{name}.model")
        return self

    def row_train(self, row: str) -> TrainConfig:
        return _merge_checked(self.train, self.rules[row].train, f"rules.{row}.train")

    def row_model(self, row: str) -> LMModelConfig:
        return _merge_checked(self.model, self.rules[row].model, f"rules.{row}.model")


class StudiesConfig(Strict):
    """The FF study types live in models/config_ff.py (linked at the bottom of this module)."""

    eqt_lm: LMStudyConfig | None = None
    rules_vision: RulesVisionConfig | None = None
    rules_ladder: RulesLadderConfig | None = None
    rules_lq: RulesLQConfig | None = None


class HealthConfig(Strict):
    fail_on: Literal["never", "error", "fatal"] = "never"


class Params(Strict):
    """The root of params.yaml."""

    seeds: Annotated[list[int], Field(min_length=1)] = [0, 1, 2]
    device: str = "auto"
    threads: Annotated[int, Field(gt=0)] = 1
    data: DataConfig = DataConfig()
    studies: StudiesConfig
    health: HealthConfig = HealthConfig()

    @model_validator(mode="after")
    def _device(self) -> Params:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        return self

    def study(self, name: str) -> Any:
        """The study's config (LMStudyConfig, RulesVisionConfig, ...): all offer ``rows``,
        ``rules``, ``row_train(row)`` and ``row_model(row)``."""
        cfg = getattr(self.studies, name, None)
        if cfg is None:
            enabled = [n for n, c in self.studies if c is not None]
            raise ConfigError(f"study {name!r} is not configured; configured: {enabled}")
        return cfg

    def enabled_studies(self) -> list[str]:
        return [name for name, cfg in self.studies if cfg is not None]


# ---------------------------------------------------------------- loading
def load_params(path: str | os.PathLike[str] = PARAMS_FILE, profile: str | None = None) -> Params:
    """Load, merge the profile (argument or $BPFREE_PROFILE) and validate params."""
    path = Path(path)
    raw = _read_yaml(path)
    profile = profile if profile is not None else os.environ.get(PROFILE_ENV) or None
    source = str(path)
    if profile:
        profile_path = path.parent / "profiles" / f"{profile}.yaml"
        if not profile_path.is_file():
            available = sorted(p.stem for p in (path.parent / "profiles").glob("*.yaml"))
            raise ConfigError(f"profile {profile!r}: {profile_path} not found; available: "
                              f"{available}")
        raw = deep_merge(raw, _read_yaml(profile_path))
        source = f"{path} + {profile_path}"
    return validate_params(raw, source)


def validate_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_checked(base: Strict, override: dict[str, Any], where: str) -> Any:
    """Validate a per-row override against the model it overrides (same schema, same errors)."""
    if not override:
        return base
    try:
        return type(base).model_validate(deep_merge(base.model_dump(), override))
    except ValidationError as err:
        raise ValueError(format_validation_error(err, where)) from None


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in _shown_loc(err.title, e["loc"]))
        if e["type"] == "extra_forbidden":
            parent = _model_at(err.title, e["loc"][:-1])
            allowed = sorted(parent.model_fields) if parent else []
            lines.append(f"{source}: unknown key '{loc}'; allowed here: {', '.join(allowed)}")
        elif e["type"] == "union_tag_invalid":
            lines.append(f"{source}: {loc}: {e['msg']}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            where = f"{loc}: " if loc else ""
            lines.append(f"{source}: {where}{e['msg']}{shown}")
    return "\n".join(lines)


def _shown_loc(title: str, loc: tuple[Any, ...]) -> list[Any]:
    """``loc`` as the user wrote it: without validator markers and discriminator tags (pydantic
    puts the rule's ``kind`` into the path: rules.ep.ep.beta -> rules.ep.beta)."""
    models = {m.__name__: m for m in (Params, TrainConfig, LMModelConfig)}
    ann: Any = models.get(title, Params)
    shown = []
    for part in loc:
        if str(part).startswith("function-after"):
            continue
        if ann is not None and _is_tag(ann, part):
            ann = _step_into(ann, part)
            continue
        shown.append(part)
        ann = _step_into(ann, part) if ann is not None else None
    return shown


def _is_tag(annotation: Any, part: Any) -> bool:
    options = _options(annotation)
    return len(options) > 1 and any(
        isinstance(o, type) and issubclass(o, BaseModel) and "kind" in o.model_fields
        and o.model_fields["kind"].default == part for o in options)


def _model_at(title: str, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk the schema along ``loc`` to find the model whose keys are allowed there.

    ``loc`` mixes field names, dict keys (row names), list indices and discriminator tags (the
    ``kind`` of a rule); each step narrows the annotation accordingly.
    """
    models = {m.__name__: m for m in (Params, TrainConfig, LMModelConfig)}
    ann: Any = models.get(title, Params)
    for part in loc:
        ann = _step_into(ann, part)
        if ann is None:
            return None
    found = [o for o in _options(ann) if isinstance(o, type) and issubclass(o, BaseModel)]
    return found[0] if len(found) == 1 else None


def _options(annotation: Any) -> list[Any]:
    """The alternatives of an annotation, with Annotated/Optional/Union unwrapped."""
    if get_origin(annotation) is Annotated:
        return _options(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return [o for arg in get_args(annotation) for o in _options(arg) if o is not type(None)]
    return [annotation]


def _step_into(annotation: Any, part: Any) -> Any:
    options = _options(annotation)
    if _is_tag(annotation, part):
        return next(o for o in options if isinstance(o, type) and issubclass(o, BaseModel)
                    and o.model_fields.get("kind") and o.model_fields["kind"].default == part)
    for opt in options:
        if isinstance(opt, type) and issubclass(opt, BaseModel):
            if str(part) in opt.model_fields:
                return opt.model_fields[str(part)].annotation
        elif get_origin(opt) is dict:
            return get_args(opt)[1]
        elif get_origin(opt) is list and isinstance(part, int):
            return get_args(opt)[0]
    return None


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able config (what a checkpoint was made with)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# The FF study schema imports Strict/TrainConfig from here and then rebuilds StudiesConfig/Params
# with its types; importing it last keeps either import order working.
import models.config_ff  # noqa: E402, F401
