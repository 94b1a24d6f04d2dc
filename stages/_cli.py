"""What every stage shares: loading params and turning known failures into one clear message."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from models.config import ConfigError, Params, load_params
from models.data.sources import DataError
from models.training.checkpoint import CheckpointError
from models.training.device import limit_threads
from models.training.segments import GuardStop

F = TypeVar("F", bound=Callable[..., Any])

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="Parameter file (profiles "
                             "from profiles/<name>.yaml are merged over it when BPFREE_PROFILE "
                             "is set).")

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
