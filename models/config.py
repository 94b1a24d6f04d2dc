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
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


class DataConfig(Strict):
    text: TextDataConfig = TextDataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()


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


LMRule = Annotated[BPRule, Field(discriminator="kind")]


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
    eqt_lm: LMStudyConfig | None = None


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

    def study(self, name: str) -> LMStudyConfig:
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
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
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


def _model_at(title: str, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk the schema along ``loc`` to find the model whose keys are allowed there."""
    models = {m.__name__: m for m in (Params, TrainConfig, LMModelConfig)}
    model: Any = models.get(title, Params)
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = getattr(model, "model_fields", {}).get(str(part))
        if field is None:
            # a dict key (row name) or a discriminator tag: look inside the value type
            model = _inner_model(model, part)
            continue
        model = _inner_model(field.annotation, None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _inner_model(annotation: Any, part: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation if part is None else None
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg, None)
        if found is not None:
            if part is not None and "kind" in found.model_fields:
                tag = found.model_fields["kind"].default
                if tag != part:
                    continue
            return found
    metadata = getattr(annotation, "__metadata__", None)
    if metadata:
        return _inner_model(annotation.__origin__, part)
    return None


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able config (what a checkpoint was made with)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
