"""The root of params.yaml and how it is loaded: params.yaml, then the profile it names, then
command-line overrides (Snakemake's ``--config``), validated as one document.

Precedence, lowest first: ``params.yaml`` < ``profiles/<profile>.yaml`` < overrides. The profile
is the ``profile`` key (so ``dvc exp run -S profile=tiny`` and ``snakemake --config profile=tiny``
do the same thing); ``$BPFREE_PROFILE`` is a shell shortcut for the same key. Overrides come as
a nested mapping (``$BPFREE_OVERRIDES``, JSON), merged and validated like params.yaml itself, so
an unknown key is an error, never silently dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import Field, ValidationError, model_validator

from models.config.base import ConfigError, Strict, StudyConfig, deep_merge, format_validation_error
from models.config.bridge import BridgeStudyConfig
from models.config.data import DataConfig
from models.config.eqt import LMStudyConfig
from models.config.ff import RulesLadderConfig, RulesLQConfig, RulesVisionConfig
from models.config.seq import DTPWMConfig, PCSeqConfig

S = TypeVar("S", bound=StudyConfig)

PARAMS_FILE = Path("params.yaml")
PROFILE_ENV = "BPFREE_PROFILE"
OVERRIDES_ENV = "BPFREE_OVERRIDES"
DEFAULT_PROFILE = "default"  # profiles/default.yaml: no changes


class StudiesConfig(Strict):
    """One optional entry per study of ``models.studies.STUDIES``; absent = not run."""

    eqt_lm: LMStudyConfig | None = None
    rules_vision: RulesVisionConfig | None = None
    rules_ladder: RulesLadderConfig | None = None
    rules_lq: RulesLQConfig | None = None
    pc_seq: PCSeqConfig | None = None
    dtp_wm: DTPWMConfig | None = None
    bridge: BridgeStudyConfig | None = None


class HealthConfig(Strict):
    fail_on: Literal["never", "error", "fatal"] = "never"


class Params(Strict):
    """The root of params.yaml."""

    profile: str = DEFAULT_PROFILE
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

    def study(self, name: str) -> StudyConfig:
        """The study's config (``LMStudyConfig``, ``RulesVisionConfig``, ...)."""
        cfg = getattr(self.studies, name, None)
        if cfg is None:
            raise ConfigError(f"study {name!r} is not configured; configured: "
                              f"{self.enabled_studies()}")
        return cfg

    def study_as(self, name: str, kind: type[S]) -> S:
        """The study's config as its own class (what the study's code works with)."""
        cfg = self.study(name)
        if not isinstance(cfg, kind):
            raise TypeError(f"studies.{name} is a {type(cfg).__name__}, not a {kind.__name__}")
        return cfg

    def enabled_studies(self) -> list[str]:
        return [name for name, cfg in self.studies if cfg is not None]


def load_params(path: str | os.PathLike[str] = PARAMS_FILE, profile: str | None = None,
                overrides: dict[str, Any] | None = None) -> Params:
    """params.yaml + its profile + overrides (arguments, else $BPFREE_PROFILE/$BPFREE_OVERRIDES)."""
    path = Path(path)
    raw = read_yaml(path)
    if overrides is None:
        overrides = env_overrides()
    user = deep_merge(raw, overrides)
    name = (profile or overrides.get("profile") or os.environ.get(PROFILE_ENV)
            or raw.get("profile") or DEFAULT_PROFILE)
    source = str(path)
    profile_path = profiles_dir(path) / f"{name}.yaml"
    missing = not isinstance(name, str) or not profile_path.is_file()
    if missing and name != DEFAULT_PROFILE:  # the default profile changes nothing: may be absent
        available = sorted(p.stem for p in profiles_dir(path).glob("*.yaml"))
        raise ConfigError(f"profile {name!r}: {profile_path} not found; available: {available}")
    layer = {} if missing else read_yaml(profile_path)
    if "profile" in layer:
        raise ConfigError(f"{profile_path}: a profile cannot name another profile")
    user = deep_merge(deep_merge(raw, layer), overrides)
    user["profile"] = name
    if name != DEFAULT_PROFILE:
        source = f"{path} + {profile_path}"
    if overrides:
        source += " + overrides"
    return validate_params(user, source)


def profiles_dir(params_path: Path) -> Path:
    return params_path.parent / "profiles"


def env_overrides() -> dict[str, Any]:
    text = os.environ.get(OVERRIDES_ENV, "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"${OVERRIDES_ENV}: not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"${OVERRIDES_ENV}: must be a JSON object of params keys")
    return value


def changed_keys(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """The part of ``new`` that differs from ``old`` (nested): what ``--config`` overrode.

    Snakemake merges ``--config`` into params.yaml's mapping; only the changed leaves are
    overrides, so that a profile's values are not reset to params.yaml's."""
    out: dict[str, Any] = {}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            sub = changed_keys(value, old[key])
            if sub:
                out[key] = sub
        elif key not in old or old[key] != value:
            out[key] = value
    return out


def validate_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, Params)) from None


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return data
