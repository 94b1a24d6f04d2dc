"""What every stage shares: loading params and turning known failures into one clear message."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from models.config import Params, load_params
from models.errors import CheckpointError, ConfigError, DataError, GuardStop
from models.studies import STUDIES
from models.training.device import limit_threads

F = TypeVar("F", bound=Callable[..., Any])

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="Parameter file; the profile "
                             "it names (key `profile`, or $BPFREE_PROFILE) is merged over it, "
                             "then $BPFREE_OVERRIDES (JSON, set by the Snakefile from --config).")

EXPECTED = (ConfigError, DataError, CheckpointError, GuardStop, ValueError, FileNotFoundError,
            KeyError)


def app(help_text: str) -> typer.Typer:
    return typer.Typer(help=help_text, add_completion=False, pretty_exceptions_enable=False)


def clear_errors(func: F) -> F:
    """Known input problems exit with status 2 and one message, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EXPECTED as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            print(f"error: {message}", file=sys.stderr)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def load(params_path: Path) -> Params:
    params = load_params(params_path)
    limit_threads(params.threads)
    return params


def study_enabled(params: Params, study: str) -> bool:
    """A study DVC knows (from params.yaml) that the active profile turned off: nothing to do."""
    if study in params.enabled_studies():
        return True
    if study not in STUDIES:
        raise KeyError(f"unknown study {study!r}; known: {sorted(STUDIES)}")
    print(f"{study}: not enabled under profile {params.profile!r}; nothing to do")
    return False


def check_row(params: Params, study: str, row: str, seed: int | None = None) -> None:
    rows = params.study(study).rows
    if row not in rows:
        raise ValueError(f"row {row!r} is not in studies.{study}.rows {rows}")
    if seed is not None and seed not in params.seeds:
        raise ValueError(f"seed {seed} is not in seeds {params.seeds}")
