"""Hidden layers matter at the study's own settings: rules_vision as params.yaml configures it
(MNIST-1D, the default model, training and rule parameters, 20 epochs), seed 1. Each rule must
beat the head trained alone on the frozen initial features at the same budget (the baseline the
calibrate stage measures) by a wide margin, and DFA must reach issue 13's 40%.

The XOR test (test_ff_hidden.py) runs far from these settings and passed while two rules failed
here: DFA with a feedback matrix per layer (0.396 on this seed) and the credit bridge whose value
net learned at 1e-3 (0.290 against the head alone's 0.31). Each rule here takes seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import health_runs as hr
import pytest
import torch
from conftest import ROOT

from models.config import load_params
from models.context import RunContext
from models.pipeline import RunSpec
from models.studies import get_study
from models.training.schedule import lr_at

CPU = RunContext(torch.device("cpu"))
MARGIN = 0.12  # rules reach 0.55-0.60 at these settings, the head alone 0.31-0.32
SEED = 1


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The standard MNIST-1D split (5,000 samples: 4,000 train / 1,000 test) in a fresh cwd."""
    with hr.project(tmp_path_factory.mktemp("vision")) as path:
        hr.write_mnist1d(5000)
        yield path


def train(row: str) -> tuple[float, float]:
    """(test accuracy after the row's default budget, the calibrated head-only baseline)."""
    params = load_params(ROOT / "params.yaml", profile="default",
                         overrides={"studies": {"rules_vision": {"rows": [row]}}})
    study = get_study("rules_vision")
    cal = study.calibrate(params, row, CPU)
    head = next(b for b in cal["health"]["baselines"] if b["name"] == "head_only")
    cfg = params.study("rules_vision").row_train(row)
    spec = RunSpec("rules_vision", row, SEED)
    trainer = study.build_trainer(params, spec, cal, CPU)
    for step in range(cfg.steps):
        trainer.train_step(step, lr_at(step, cfg))
    return study.diagnose(params, spec, trainer, CPU)["metrics"]["test_accuracy"], head["value"]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("row", ["dfa", "state_bridge", "credit_bridge"])
def test_rule_beats_head_only_at_study_settings(workdir: Path, row: str) -> None:
    acc, head = train(row)
    assert acc > head + MARGIN, (acc, head)
    if row == "dfa":
        assert acc >= 0.45, acc
