"""An EP run of the eqt_lm study driven to divergence by its learning rate, with the pipeline's
own stages (calibrate -> train segments -> diagnose) at a CPU-sized config: it learns during
the warm-up (segment 0), then |grad| and the loss run away as the rate climbs past what the
block tolerates (segment 1). Checks the findings diagnose writes, the live guard (stops
segment 1, keeps segment 0's checkpoint), and diagnose on the run directory moved to another
machine whose params name a device it lacks."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import health_runs as hr
import pytest
import torch
import yaml

from models.config import validate_params
from models.pipeline import RunSpec, run_identity
from models.training import checkpoint
from models.training.segments import GuardStop
from stages import diagnose, train

SPEC = RunSpec("eqt_lm", "ep", 0)
RUN = "eqt_lm/ep/seed0"


def diverging_params(live_guard: bool = False) -> dict[str, Any]:
    """lr 1.0 reached at the end of an 80-step warm-up, no clipping: stable at lr <= 0.3 (the
    first segment), diverging on the way to 1.0 (the second)."""
    relax = {"eps": 0.25, "t1": 8, "t1max": 24}
    return hr.params({"eqt_lm": {
        "rows": ["ep"], "model": {"n_embd": 16, "n_head": 2, "n_layer": 1, "block_size": 16},
        "train": {"batch_size": 8, "steps": 80, "segment_steps": 40, "lr": 1.0, "min_lr": 0.1,
                  "warmup_steps": 80, "decay_steps": 80, "grad_clip": 0.0, "log_every": 5,
                  "eval_every": 20, "eval_batches": 2, "live_guard": live_guard},
        "rules": {"ep": {"kind": "ep", "relax": relax, "cos_every": 10,
                         "nudge": {"beta": 0.02, "t2": 4, "aep": "tracking"}}}}}, threads=1)


@pytest.fixture(scope="module")
def diverged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    with hr.project(tmp_path_factory.mktemp("ep_diverged")) as path:
        hr.write_corpus(300)
        yield path, hr.run(diverging_params(), "eqt_lm", "ep")


def by_detector(diag: dict[str, Any], detector: str) -> list[dict[str, Any]]:
    return [f for f in diag["health"] if f["detector"] == detector]


def test_diverged_ep_is_worse_than_chance_and_divergent(diverged: tuple[Path, dict]) -> None:
    _, diag = diverged
    chance = [f for f in by_detector(diag, "worse_than_chance") if f["severity"] == "fatal"]
    assert any("loss" in f["where"] for f in chance), hr.show(diag["health"])
    assert all(f["run"] == RUN and f["evidence"]["ratio"] > 1.5 for f in chance)
    (div,) = [f for f in by_detector(diag, "divergence") if f["where"].startswith("trace "
                                                                                   "column loss")]
    assert div["severity"] == "error" and div["evidence"]["late"] > 3 * div["evidence"]["best"]
    assert "grad/" in div["message"] and div["evidence"]["best_step"] <= 60


def test_diverged_ep_runaway_norms_are_named(diverged: tuple[Path, dict]) -> None:
    _, diag = diverged
    runaway = {f["message"].split()[1]: f for f in by_detector(diag, "runaway_norms")}
    assert "grad" in runaway, hr.show(diag["health"])
    f = runaway["grad"]
    assert f["run"] == RUN and f["evidence"]["ratio"] > 10 and "grad/block." in f["message"]


def test_diverged_ep_at_the_float_floor_is_a_frozen_explosion(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              ) -> None:
    """The issue's run: the loss explodes while the free-phase residual reads ~3e-8. Here the
    same diverging recipe relaxes to the float floor (res_target 5e-8: every free phase runs
    until eps F is rounding noise of z), so the residual says "converged" throughout the
    blow-up, and frozen_explosion must name it, fatal, on the trace columns it read."""
    monkeypatch.chdir(tmp_path)
    hr.write_corpus(300)
    p = diverging_params()
    p["studies"]["eqt_lm"]["rules"]["ep"]["relax"] = {"eps": 0.25, "t1": 8, "t1max": 48,
                                                      "res_target": 5e-8}
    diag = hr.run(p, "eqt_lm", "ep")
    (frozen,) = by_detector(diag, "frozen_explosion")
    assert frozen["severity"] == "fatal" and frozen["run"] == RUN, hr.show(diag["health"])
    assert frozen["evidence"]["residual"] <= 1.2e-6 < 1e-4  # "converged" by any tolerance
    assert frozen["evidence"]["loss"] > 1.5 * diag["metrics"]["ln_vocab"]
    assert frozen["where"].startswith("trace columns residual, loss")


def copy_run(src: Path, dst: Path) -> None:
    """The run's directory tree (runs/, data/) under another root, as if moved elsewhere."""
    for name in ("runs", "data"):
        shutil.copytree(src / name, dst / name)


def test_live_guard_stops_the_diverging_segment(diverged: tuple[Path, dict], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    copy_run(diverged[0], tmp_path)
    monkeypatch.chdir(tmp_path)
    p = diverging_params(live_guard=True)
    hr.PARAMS.write_text(yaml.safe_dump(p))
    fp = run_identity(validate_params(p), SPEC)  # live_guard is not part of it
    SPEC.ckpt(1).unlink()
    SPEC.log(1).unlink()
    with pytest.raises(GuardStop, match="worse_than_chance|runaway_norms|non_finite") as err:
        train.main.__wrapped__(study="eqt_lm", row="ep", seed=0, segment=1,  # type: ignore[attr-defined]
                               params=hr.PARAMS)
    assert str(SPEC.ckpt(0)) in str(err.value) and "segment 1" in str(err.value)
    assert checkpoint.is_valid(SPEC.ckpt(0), identity=fp, step=40)
    assert not SPEC.ckpt(1).exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_live_guard_stops_the_diverging_segment_on_cuda(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same recipe trained on the GPU from scratch: the guard reads the CUDA run's own
    trace (device tensors, asynchronous steps) and stops segment 1, keeping segment 0."""
    monkeypatch.chdir(tmp_path)
    hr.write_corpus(300)
    p = diverging_params(live_guard=True) | {"device": "cuda"}
    with pytest.raises(GuardStop, match="worse_than_chance|runaway_norms|frozen_explosion"):
        hr.run(p, "eqt_lm", "ep")
    assert checkpoint.is_valid(SPEC.ckpt(0), identity=run_identity(validate_params(p), SPEC),
                               step=40)
    assert not SPEC.ckpt(1).exists()


def test_diagnose_on_a_moved_run_without_its_device(diverged: tuple[Path, dict],
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The run directory trained elsewhere: copied to a new root, params naming CUDA on a
    machine without it (checkpoints load with map_location='cpu'). Same findings."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a laptop, also on a GPU box
    path, diag = diverged
    copy_run(path, tmp_path)
    monkeypatch.chdir(tmp_path)
    hr.PARAMS.write_text(yaml.safe_dump(diverging_params() | {"device": "cuda"}))
    diagnose.main.__wrapped__(study="eqt_lm", row="ep", seed=0, any_identity=False,  # type: ignore[attr-defined]
                              params=hr.PARAMS)
    moved = json.loads(SPEC.diagnostics.read_text())
    assert [f["detector"] for f in moved["health"]] == [f["detector"] for f in diag["health"]]
    assert moved["metrics"]["final_val_loss"] == pytest.approx(diag["metrics"]["final_val_loss"])
