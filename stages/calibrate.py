"""Stage 3: measure what training needs before it starts (per study row), as JSON."""

from __future__ import annotations

from pathlib import Path

import typer

from models import io
from models.pipeline import RunSpec
from models.studies import get_study
from models.training.device import resolve_device
from stages._cli import PARAMS_OPTION, app, clear_errors, load

cli = app(__doc__ or "")


@cli.command()
@clear_errors
def main(study: str = typer.Option(..., help="Study key under params `studies`, e.g. eqt_lm."),
         row: str = typer.Option(..., help="Row (learning rule) of that study, e.g. bp."),
         params: Path = PARAMS_OPTION) -> None:
    """Write runs/<study>/<row>/calibration.json.

    What is measured is the study's business (LM: initial loss vs ln V, activation RMS, an LR
    probe; EP: free-phase residual, step size and T1). A measurement that shows training cannot
    work fails here with a message naming the param to change.
    """
    cfg = load(params)
    if row not in cfg.study(study).rows:
        raise ValueError(f"row {row!r} is not in studies.{study}.rows {cfg.study(study).rows}")
    result = get_study(study).calibrate(cfg, row, resolve_device(cfg.device))
    out = RunSpec(study, row, 0).calibration
    io.write_json(out, result)
    print(f"calibrate: {study}/{row} -> {out}")


if __name__ == "__main__":
    cli()
