"""Stage 4: train runs in segments, each a separate process that resumes from the last one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer

from models import io
from models.config import Params
from models.context import RunContext
from models.health import calibration_extras, live_guard
from models.pipeline import RunSpec, run_config, run_identity, runs, study_dir
from models.studies import get_study
from models.training import checkpoint
from models.training.device import resolve_device
from models.training.segments import Segment, read_logs, run_segment
from stages._cli import PARAMS_OPTION, app, check_row, clear_errors, load, study_enabled

cli = app(__doc__ or "")


@cli.command()
@clear_errors
def main(study: str = typer.Option(..., help="Study key under params `studies`."),
         row: str | None = typer.Option(None, help="Row (learning rule) of that study; "
                                                   "without it, every row."),
         seed: int | None = typer.Option(None, help="Seed (one of params `seeds`); without it, "
                                                    "every seed."),
         segment: int | None = typer.Option(
             None, help="Train only this segment (needs --row, --seed and the previous "
                        "segment's checkpoint). Without it, run every missing segment, each in "
                        "a fresh process."),
         params: Path = PARAMS_OPTION) -> None:
    """Train runs/<study>/train/<row>/seed<seed>: ckpt/seg<i>.pt and log/seg<i>.jsonl.

    Segment i covers steps [i*segment_steps, min((i+1)*segment_steps, steps)). Checkpoints hold
    the full state (weights, optimizer, EMA, the rule's state, data position, RNGs) and are resumed
    only under the same run identity (training config, code, calibration, data); a changed
    identity retrains from segment 0, and raising `steps` reuses finished segments.
    """
    cfg = load(params)
    study_dir(study, "train").mkdir(parents=True, exist_ok=True)
    if not study_enabled(cfg, study):
        return
    if segment is not None:
        if row is None or seed is None:
            raise ValueError("--segment needs --row and --seed")
        check_row(cfg, study, row, seed)
        _train_segment(cfg, RunSpec(study, row, seed), segment)
        return
    if row is not None:
        check_row(cfg, study, row, seed)
    for spec in runs(cfg, study):
        if row in (None, spec.row) and seed in (None, spec.seed):
            _run_missing(cfg, spec, params)


def _train_segment(cfg: Params, spec: RunSpec, segment: int) -> None:
    train_cfg = cfg.study(spec.study).row_train(spec.row)
    if not 0 <= segment < train_cfg.n_segments:
        raise ValueError(f"--segment {segment} out of range: steps={train_cfg.steps} with "
                         f"segment_steps={train_cfg.segment_steps} gives segments "
                         f"0..{train_cfg.n_segments - 1}")
    if not spec.calibration.is_file():
        raise FileNotFoundError(f"{spec.calibration} not found; run `python -m stages.calibrate "
                                f"--study {spec.study} --row {spec.row}`")
    ctx = RunContext(resolve_device(cfg.device))
    calibration = io.read_json(spec.calibration)
    trainer = get_study(spec.study).build_trainer(cfg, spec, calibration, ctx)
    seg = Segment(index=segment, start=segment * train_cfg.segment_steps,
                  end=train_cfg.segment_end(segment), ckpt=spec.ckpt(segment),
                  prev_ckpt=spec.ckpt(segment - 1) if segment else None, log=spec.log(segment))
    guard = live_guard(extras=calibration_extras(calibration),
                       history=[r for r in read_logs(spec.log_dir) if r["step"] <= seg.start],
                       ) if train_cfg.live_guard else None
    rows = run_segment(trainer, seg, train_cfg, run_identity(cfg, spec), guard,
                       label=spec.name(), config=run_config(cfg, spec))
    last = rows[-1] if rows else {}
    print(f"train: {spec.name()} segment {segment} steps {seg.start}-{seg.end} "
          f"loss {last.get('loss', float('nan')):.4f}")


def _run_missing(cfg: Params, spec: RunSpec, params: Path) -> None:
    """Resume from the last segment of this identity and run the rest, one process each."""
    train_cfg = cfg.study(spec.study).row_train(spec.row)
    identity = run_identity(cfg, spec)
    for index in range(train_cfg.n_segments):
        if checkpoint.is_valid(spec.ckpt(index), identity=identity,
                               step=train_cfg.segment_end(index)):
            continue
        _drop_from(spec, index)
        subprocess.run([sys.executable, "-m", "stages.train", "--study", spec.study, "--row",
                        spec.row, "--seed", str(spec.seed), "--segment", str(index),
                        "--params", str(params)], check=True)


def _drop_from(spec: RunSpec, index: int) -> None:
    """Segments from an invalid one on were made from other state: remove them."""
    for path in [*spec.ckpt_dir.glob("seg*.pt"), *spec.ckpt_dir.glob("seg*.json"),
                 *spec.log_dir.glob("seg*.jsonl")]:
        if int(path.stem[3:]) >= index:
            path.unlink()


if __name__ == "__main__":
    cli()
