"""Stage 5: read a run's final state and logs; compute held-out metrics and what its study declares."""

from __future__ import annotations

from pathlib import Path

import typer

from models import io
from models.pipeline import RunSpec, run_config, training_fingerprint
from models.studies import get_study
from models.training import checkpoint
from models.training.device import resolve_device
from models.training.segments import read_logs
from stages._cli import PARAMS_OPTION, app, clear_errors, load

cli = app(__doc__ or "")


@cli.command()
@clear_errors
def main(study: str = typer.Option(..., help="Study key under params `studies`."),
         row: str = typer.Option(..., help="Row (learning rule) of that study."),
         seed: int = typer.Option(..., help="Seed (one of params `seeds`)."),
         params: Path = PARAMS_OPTION) -> None:
    """Write runs/<study>/<row>/seed<seed>/diagnostics.json.

    Metrics are computed on the validation split (never the training windows); the training
    curves are summarised from the segment logs (best val CE, time per step, peak memory).
    """
    cfg = load(params)
    spec = RunSpec(study, row, seed)
    train_cfg = cfg.study(study).row_train(row)
    last = train_cfg.n_segments - 1
    state = checkpoint.load(spec.ckpt(last), fingerprint=training_fingerprint(cfg, spec),
                            step=train_cfg.steps)
    device = resolve_device(cfg.device)
    impl = get_study(study)
    trainer = impl.build_trainer(cfg, spec, io.read_json(spec.calibration), device)
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
    result.update({"run": spec.name(), "run_dir": str(spec.dir), "config": run_config(cfg, spec),
                   "fingerprint": training_fingerprint(cfg, spec)})
    io.write_json(spec.diagnostics, result)
    print(f"diagnose: {spec.name()} val CE {result['metrics']['val_loss']:.4f} -> "
          f"{spec.diagnostics}")


if __name__ == "__main__":
    cli()
