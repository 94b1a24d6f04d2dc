"""Nothing lost: segmented training equals one uninterrupted run, and a killed segment costs only
that segment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from models.config import load_params
from models.context import RunContext
from models.pipeline import RunSpec, training_fingerprint
from models.studies import get_study
from models.training.device import limit_threads
from models.training.segments import Segment, run_segment
from tests.conftest import stage, tiny_params


def _prepare(project, steps: int, segment_steps: int) -> None:
    # the bp row sets its own steps (tiny restates them over params.yaml's CPU 1,200)
    raw = tiny_params({"studies": {"eqt_lm": {
        "train": {"steps": steps, "segment_steps": segment_steps},
        "rules": {"bp": {"kind": "bp", "train": {"steps": steps}}}}}})
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    stage("stages.prepare")
    stage("stages.bpe")
    stage("stages.calibrate", "--study", "eqt_lm", "--row", "bp")


def _train_in_process(spec: RunSpec, n_segments: int, tag: str) -> dict:
    """Train with a fresh trainer object per segment (as separate processes would)."""
    params = load_params("params.yaml")
    limit_threads(params.threads)  # same reduction order as the stage processes
    cfg = params.study("eqt_lm").row_train("bp")
    study = get_study("eqt_lm")
    fp = {"config": training_fingerprint(params, spec)}  # a run identity (config part only)
    size = cfg.steps // n_segments
    prev = None
    for i in range(n_segments):
        torch.manual_seed(1234 + i)  # scramble global RNG: the checkpoint must restore it
        trainer = study.build_trainer(params, spec, {}, RunContext(torch.device("cpu")))
        ckpt = spec.dir / tag / f"seg{i}.pt"
        seg = Segment(i, i * size, (i + 1) * size, ckpt, prev, spec.dir / tag / f"seg{i}.jsonl")
        run_segment(trainer, seg, cfg.model_copy(update={"segment_steps": size}), fp)
        prev = ckpt
    return torch.load(prev, weights_only=False)["trainer"]


def test_segments_equal_uninterrupted_bitwise(project) -> None:
    _prepare(project, steps=30, segment_steps=10)
    spec = RunSpec("eqt_lm", "bp", 0)
    one = _train_in_process(spec, 1, "one")
    three = _train_in_process(spec, 3, "three")
    for name, tensor in one["model"].items():
        assert torch.equal(tensor, three["model"][name]), name
    exp_avg = [s["exp_avg"] for s in three["optimizer"]["state"].values()]
    ref_avg = [s["exp_avg"] for s in one["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(exp_avg, ref_avg, strict=True))
    assert torch.equal(one["batches"]["generator"], three["batches"]["generator"])


def test_sigkill_mid_segment_then_resume(project) -> None:
    _prepare(project, steps=3000, segment_steps=1500)  # ~5 s per segment
    run = ["--study", "eqt_lm", "--row", "bp", "--seed", "0"]
    spec = RunSpec("eqt_lm", "bp", 0)
    stage("stages.train", *run, "--segment", "0")
    seg0 = spec.ckpt(0).read_bytes()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "stages.train", *run, "--segment", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_until_training(proc.pid)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not spec.ckpt(1).exists(), "a killed segment must not leave a checkpoint"
    assert spec.ckpt(0).read_bytes() == seg0, "the last complete segment must be untouched"
    stage("stages.train", *run)  # resumes: runs segment 1 only
    resumed = torch.load(spec.ckpt(1), weights_only=False)
    assert resumed["step"] == 3000 and spec.ckpt(0).read_bytes() == seg0
    reference = _train_in_process(spec, 1, "uninterrupted")
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, resumed["trainer"]["model"][name]), name


def _wait_until_training(pid: int, cpu_seconds: float = 4.0, timeout: float = 60.0) -> None:
    """Wait until the child has burnt enough CPU to be past imports and inside the step loop."""
    ticks = os.sysconf("SC_CLK_TCK")
    deadline = time.time() + timeout
    while time.time() < deadline:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if (int(fields[11]) + int(fields[12])) / ticks >= cpu_seconds:
            return
        time.sleep(0.1)
    raise AssertionError("child never started training")
