"""params.yaml -> validated config objects, the one config layer of bpfree.

Config flows one way: params.yaml (+ profile + overrides) -> these pydantic classes -> stages ->
the library, which takes these same classes (``models.eqt`` takes ``RelaxConfig``,
``StabiliserConfig`` and ``NudgeConfig``). The package imports neither torch nor the library.

Modules: ``base`` (strict models, merging, error messages), ``data``, ``train``, ``eqt`` (the
language-model study), ``ff`` (the feed-forward rule studies), ``params`` (the root and loading).
"""

from models.config.base import ConfigError, Strict, StudyConfig, deep_merge, fingerprint
from models.config.data import DataConfig, Mnist1DDataConfig, TextDataConfig, TokenizerConfig
from models.config.params import (
    PARAMS_FILE,
    PROFILE_ENV,
    HealthConfig,
    Params,
    StudiesConfig,
    load_params,
    validate_params,
)
from models.config.train import TrainConfig

__all__ = ["PARAMS_FILE", "PROFILE_ENV", "ConfigError", "DataConfig", "HealthConfig",
           "Mnist1DDataConfig", "Params", "Strict", "StudiesConfig", "StudyConfig",
           "TextDataConfig", "TokenizerConfig", "TrainConfig", "deep_merge",
           "fingerprint", "load_params", "validate_params"]
