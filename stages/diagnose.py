"""Stage 5: read a run's final state and logs; compute held-out metrics and what its study declares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import typer

from models import io
from models.config import Params
from models.context import RunContext
from models.health import Finding, Severity, calibration_extras, run_all
from models.pipeline import RunSpec, diagnose_identity, run_config, run_identity, runs, study_dir
from models.studies import get_study
from models.studies.base import RunRecord
from models.training import checkpoint
from models.training.device import resolve_device
from models.training.segments import read_logs
from stages._cli import PARAMS_OPTION, app, check_row, clear_errors, load, study_enabled

cli = app(__doc__ or "")


class HealthFailure(ValueError):
    """A finding at or above params `health.fail_on` (off by default: findings are data)."""


@cli.command()
@clear_errors
def main(study: str = typer.Option(..., help="Study key under params `studies`."),
         row: str | None = typer.Option(None, help="Row (learning rule); without it, every "
                                                   "row whose diagnostics are stale."),
         seed: int | None = typer.Option(None, help="Seed (one of params `seeds`)."),
         any_identity: bool = typer.Option(
             False, "--any-identity", help="Diagnose checkpoints made under another run identity "
             "(e.g. trained on another machine from another checkout); the report marks such "
             "runs stale."),
         stale_only: bool = typer.Option(
             False, "--stale-only", help="With --row: diagnose only if its diagnostics are "
             "missing or stale (scripts that run stages by hand)."),
         params: Path = PARAMS_OPTION) -> None:
    """Write runs/<study>/diagnostics/<row>/seed<seed>.json.

    Metrics are computed on the held-out split (never the training windows); the training
    curves are summarised from the segment logs (best val CE, time per step, peak memory); the
    health detectors (models/health) run on the logs and the study's extras. Exit status is 0
    whatever they find unless params `health.fail_on` is error or fatal.
    """
    cfg = load(params)
    study_dir(study, "diagnostics").mkdir(parents=True, exist_ok=True)
    if not study_enabled(cfg, study):
        return
    if row is not None:
        check_row(cfg, study, row, seed)
    findings: list[Finding] = []
    for spec in runs(cfg, study):
        if row in (None, spec.row) and seed in (None, spec.seed):
            findings += _diagnose(cfg, spec, force=row is not None and not stale_only,
                                  any_identity=any_identity)
    if cfg.health.fail_on != "never":
        worst = [f for f in findings if f.severity >= Severity.parse(cfg.health.fail_on)]
        if worst:
            raise HealthFailure(f"health.fail_on={cfg.health.fail_on}: {worst[0]}")


def _diagnose(cfg: Params, spec: RunSpec, force: bool, any_identity: bool) -> list[Finding]:
    train_cfg = cfg.study(spec.study).row_train(spec.row)
    last_ckpt = spec.ckpt(train_cfg.n_segments - 1)
    identity = diagnose_identity(cfg, spec, last_ckpt)
    if not force and spec.diagnostics.is_file():
        previous = io.read_json(spec.diagnostics)
        if previous.get("identity") == identity:
            print(f"diagnose: {spec.name()} is current")
            return [Finding.from_dict(f) for f in previous.get("health", [])]
    state = checkpoint.load(last_ckpt, identity=None if any_identity else run_identity(cfg, spec),
                            step=train_cfg.steps)
    ctx = RunContext(_device(cfg.device))
    impl = get_study(spec.study)
    calibration = io.read_json(spec.calibration)
    trainer = impl.build_trainer(cfg, spec, calibration, ctx)
    trainer.load_state_dict(state["trainer"])
    logs = read_logs(spec.log_dir)
    result = impl.diagnose(cfg, spec, trainer, ctx, RunRecord(calibration, logs))
    val = [r["val_loss"] for r in logs if "val_loss" in r]
    if val:  # studies whose evaluation reports a held-out loss
        result["metrics"]["best_val_loss"] = min(val)
    if "val_loss" in result["metrics"]:
        result["metrics"]["final_val_loss"] = result["metrics"]["val_loss"]
    result["metrics"].update({
        # median over logging windows: the steady step time (start-up and cosine checks aside)
        "ms_per_step": float(np.median([r["time/ms_per_step"] for r in logs])),
        "peak_mem_mb": max(r["mem/peak_mb"] for r in logs),
        "steps": train_cfg.steps,
    })
    config = run_config(cfg, spec)
    references = calibration_extras(calibration)
    kind = config["rule"].get("kind")  # a baseline row is not judged against itself
    references["baselines"] = [b for b in references.get("baselines", []) if b["name"] != kind]
    extras = {**references, **result.pop("extras", {}),
              "config_train": state.get("config") or config, "config_eval": config,
              "metrics": result["metrics"], "warmup_steps": train_cfg.warmup_steps}
    findings = run_all(pd.DataFrame.from_records(logs), extras, run=spec.name())
    result.update({"run": spec.name(), "run_dir": str(spec.dir), "config": config,
                   "baselines": references["baselines"],
                   "run_identity": state["identity"], "identity": identity,
                   "health": [f.to_dict() for f in findings]})
    io.write_json(spec.diagnostics, result)
    print(f"diagnose: {spec.name()} val {result['metrics'].get('val_loss', float('nan')):.4f}, "
          f"{len(findings)} health findings -> {spec.diagnostics}")
    for finding in findings:
        print(f"  {finding}")
    return findings


def _device(name: str) -> torch.device:
    """The params' device, or the CPU when it names CUDA on a machine without one: a run trained
    on a GPU is diagnosed on a laptop (checkpoints load with map_location='cpu')."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        print(f"diagnose: device {name!r} is not available here; diagnosing on the CPU")
        return torch.device("cpu")
    return resolve_device(name)


if __name__ == "__main__":
    cli()
