"""Stage 5: read a run's final state and logs; compute held-out metrics and what its study declares."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
import typer

from models import io
from models.health import Severity, calibration_extras, run_all
from models.pipeline import RunSpec, run_config, training_fingerprint
from models.studies import get_study
from models.training import checkpoint
from models.training.device import resolve_device
from models.training.segments import read_logs
from stages._cli import PARAMS_OPTION, app, clear_errors, load

cli = app(__doc__ or "")


class HealthFailure(ValueError):
    """A finding at or above params `health.fail_on` (off by default: findings are data)."""


@cli.command()
@clear_errors
def main(study: str = typer.Option(..., help="Study key under params `studies`."),
         row: str = typer.Option(..., help="Row (learning rule) of that study."),
         seed: int = typer.Option(..., help="Seed (one of params `seeds`)."),
         params: Path = PARAMS_OPTION) -> None:
    """Write runs/<study>/<row>/seed<seed>/diagnostics.json.

    Metrics are computed on the held-out split (never the training windows); the training
    curves are summarised from the segment logs (best val CE, time per step, peak memory); the
    health detectors (models/health) run on the logs and the study's extras. Exit status is 0
    whatever they find unless params `health.fail_on` is error or fatal.
    """
    cfg = load(params)
    spec = RunSpec(study, row, seed)
    train_cfg = cfg.study(study).row_train(row)
    last = train_cfg.n_segments - 1
    state = checkpoint.load(spec.ckpt(last), fingerprint=training_fingerprint(cfg, spec),
                            step=train_cfg.steps)
    device = _device(cfg.device)
    impl = get_study(study)
    calibration = io.read_json(spec.calibration)
    trainer = impl.build_trainer(cfg, spec, calibration, device)
    trainer.load_state_dict(state["trainer"])
    result = impl.diagnose(cfg, spec, trainer, device)
    logs = read_logs(spec.log_dir)
    val = [r["val_loss"] for r in logs if "val_loss" in r]
    result["metrics"].update({
        "best_val_loss": min(val),
        "final_val_loss": result["metrics"]["val_loss"],
        "ms_per_step": sum(r["time/ms_per_step"] for r in logs) / max(1, len(logs)),
        "peak_mem_mb": max(r["mem/peak_mb"] for r in logs),
        "steps": train_cfg.steps,
    })
    config = run_config(cfg, spec)
    extras = {**calibration_extras(calibration), **result.pop("extras", {}),
              "config_train": state.get("config") or config, "config_eval": config,
              "metrics": result["metrics"], "warmup_steps": train_cfg.warmup_steps}
    findings = run_all(pd.DataFrame.from_records(logs), extras, run=spec.name())
    result.update({"run": spec.name(), "run_dir": str(spec.dir), "config": config,
                   "fingerprint": training_fingerprint(cfg, spec),
                   "health": [f.to_dict() for f in findings]})
    io.write_json(spec.diagnostics, result)
    print(f"diagnose: {spec.name()} val {result['metrics']['val_loss']:.4f}, "
          f"{len(findings)} health findings -> {spec.diagnostics}")
    for finding in findings:
        print(f"  {finding}")
    if cfg.health.fail_on != "never" and any(
            f.severity >= Severity.parse(cfg.health.fail_on) for f in findings):
        raise HealthFailure(f"health.fail_on={cfg.health.fail_on}: {findings[0]}")


def _device(name: str) -> torch.device:
    """The params' device, or the CPU when it names CUDA on a machine without one: a run trained
    on a GPU is diagnosed on a laptop (checkpoints load with map_location='cpu')."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        print(f"diagnose: device {name!r} is not available here; diagnosing on the CPU")
        return torch.device("cpu")
    return resolve_device(name)


if __name__ == "__main__":
    cli()
