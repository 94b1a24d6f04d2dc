"""Stage 3: measure what training needs before it starts (per study row), as JSON."""

from __future__ import annotations

from pathlib import Path

import typer

from models import io
from models.config import Params
from models.context import RunContext
from models.pipeline import calibration_file, calibration_identity, study_dir
from models.studies import get_study
from models.training.device import resolve_device
from stages._cli import PARAMS_OPTION, app, check_row, clear_errors, load, study_enabled

cli = app(__doc__ or "")


@cli.command()
@clear_errors
def main(study: str = typer.Option(..., help="Study key under params `studies`, e.g. eqt_lm."),
         row: str | None = typer.Option(
             None, help="Row (learning rule) of that study, e.g. bp. Without it: every row "
                        "whose calibration is missing or was made by another identity."),
         stale_only: bool = typer.Option(
             False, "--stale-only", help="With --row: calibrate only if its calibration is "
             "missing or was made by another identity (scripts that run stages by hand)."),
         params: Path = PARAMS_OPTION) -> None:
    """Write runs/<study>/calibration/<row>.json.

    What is measured is the study's business (LM: initial loss vs ln V, activation RMS, an LR
    probe; EP: free-phase residual, step size and T1). A measurement that shows training cannot
    work fails here with a message naming the param to change. The file records its identity
    (config, code, data hashes); a changed identity re-calibrates.
    """
    cfg = load(params)
    study_dir(study, "calibration").mkdir(parents=True, exist_ok=True)
    if not study_enabled(cfg, study):
        return
    if row is not None:
        check_row(cfg, study, row)
    for name in [row] if row is not None else cfg.study(study).rows:
        out = calibration_file(study, name)
        if ((row is None or stale_only) and out.is_file()
                and io.read_json(out).get("identity") == calibration_identity(cfg, study, name)):
            print(f"calibrate: {study}/{name} is current")
            continue
        _calibrate(cfg, study, name)


def _calibrate(cfg: Params, study: str, row: str) -> None:
    result = get_study(study).calibrate(cfg, row, RunContext(resolve_device(cfg.device)))
    out = calibration_file(study, row)
    io.write_json(out, {**result, "identity": calibration_identity(cfg, study, row)})
    print(f"calibrate: {study}/{row} -> {out}")


if __name__ == "__main__":
    cli()
