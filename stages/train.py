"""Stage 4: train one run in segments, each a separate process that resumes from the last one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer

from models import io
from models.config import Params
from models.health import calibration_extras, live_guard
from models.pipeline import RunSpec, run_config, training_fingerprint
from models.studies import get_study
from models.training import checkpoint
from models.training.device import resolve_device
from models.training.segments import Segment, read_logs, run_segment
from stages._cli import PARAMS_OPTION, app, clear_errors, load

cli = app(__doc__ or "")


@cli.command()
@clear_errors
def main(study: str = typer.Option(..., help="Study key under params `studies`."),
         row: str = typer.Option(..., help="Row (learning rule) of that study."),
         seed: int = typer.Option(..., help="Seed (one of params `seeds`)."),
         segment: int | None = typer.Option(
             None, help="Train only this segment (needs the previous one's checkpoint). Without "
                        "it, run every missing segment, each in a fresh process."),
         params: Path = PARAMS_OPTION) -> None:
    """Train runs/<study>/<row>/seed<seed>: checkpoint ckpt/seg<i>.pt and log log/seg<i>.jsonl.

    Segment i covers steps [i*segment_steps, min((i+1)*segment_steps, steps)). Checkpoints hold
    the full state (weights, optimizer, EMA, controller, data position, RNGs) and are only
    resumed when made with the same training config; raising `steps` reuses finished segments.
    """
    cfg = load(params)
    spec = _spec(cfg, study, row, seed)
    if segment is None:
        _run_missing(cfg, spec, params)
        return
    train_cfg = cfg.study(study).row_train(row)
    if not 0 <= segment < train_cfg.n_segments:
        raise ValueError(f"--segment {segment} out of range: steps={train_cfg.steps} with "
                         f"segment_steps={train_cfg.segment_steps} gives segments "
                         f"0..{train_cfg.n_segments - 1}")
    if not spec.calibration.is_file():
        raise FileNotFoundError(f"{spec.calibration} not found; run `python -m stages.calibrate "
                                f"--study {study} --row {row}`")
    device = resolve_device(cfg.device)
    calibration = io.read_json(spec.calibration)
    trainer = get_study(study).build_trainer(cfg, spec, calibration, device)
    seg = Segment(index=segment, start=segment * train_cfg.segment_steps,
                  end=train_cfg.segment_end(segment), ckpt=spec.ckpt(segment),
                  prev_ckpt=spec.ckpt(segment - 1) if segment else None, log=spec.log(segment))
    guard = live_guard(extras=calibration_extras(calibration),
                       history=[r for r in read_logs(spec.log_dir) if r["step"] <= seg.start],
                       ) if train_cfg.live_guard else None
    rows = run_segment(trainer, seg, train_cfg, training_fingerprint(cfg, spec), guard,
                       label=spec.name(), config=run_config(cfg, spec))
    last = rows[-1] if rows else {}
    print(f"train: {spec.name()} segment {segment} steps {seg.start}-{seg.end} "
          f"loss {last.get('loss', float('nan')):.4f}")


def _spec(cfg: Params, study: str, row: str, seed: int) -> RunSpec:
    rows = cfg.study(study).rows
    if row not in rows:
        raise ValueError(f"row {row!r} is not in studies.{study}.rows {rows}")
    if seed not in cfg.seeds:
        raise ValueError(f"seed {seed} is not in seeds {cfg.seeds}")
    return RunSpec(study, row, seed)


def _run_missing(cfg: Params, spec: RunSpec, params: Path) -> None:
    """Resume from the last valid segment and run the rest, one subprocess per segment."""
    train_cfg = cfg.study(spec.study).row_train(spec.row)
    fp = training_fingerprint(cfg, spec)
    for index in range(train_cfg.n_segments):
        if checkpoint.is_valid(spec.ckpt(index), fingerprint=fp,
                               step=train_cfg.segment_end(index)):
            continue
        _drop_from(spec, index)
        subprocess.run([sys.executable, "-m", "stages.train", "--study", spec.study, "--row",
                        spec.row, "--seed", str(spec.seed), "--segment", str(index),
                        "--params", str(params)], check=True)


def _drop_from(spec: RunSpec, index: int) -> None:
    """Segments after an invalid one were made from other state: remove them."""
    for path in [*spec.ckpt_dir.glob("seg*.pt"), *spec.log_dir.glob("seg*.jsonl")]:
        if int(path.stem[3:]) >= index:
            path.unlink()


if __name__ == "__main__":
    cli()
