"""The ``bridge`` study end to end at a tiny scale (pretrain -> calibrate -> train -> diagnose
-> health), in-process on a temporary data root: the baselines every row is judged against,
the detectors on an untrained bridge and on a train/eval primer mismatch, and the clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from models.bridge.data import BridgeDataError, prepare
from models.config import ConfigError, Params, validate_params
from models.context import RunContext
from models.health import run_all
from models.pipeline import RunSpec
from models.studies.base import RunRecord
from models.studies.bridge import BridgeStudy

pytestmark = pytest.mark.usefixtures("one_thread")


def _lm(width: int, block: int, steps: int) -> dict[str, Any]:
    return {"n_embd": width, "n_head": 4, "n_layer": 2, "block_size": block,
            "train": {"steps": steps, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20,
                      "decay_steps": steps}}


def params(**rule: Any) -> Params:
    raw = {"studies": {"bridge": {
        "rows": ["v15h"],
        "task": {"corpus": {"problems": 600, "n_val": 40, "n_test": 40},
                 "source": _lm(32, 128, 60), "target": _lm(32, 64, 100),
                 "min_text_accuracy": 0.0},
        "model": {"k": 4, "depth": 1, "n_head": 4},
        "train": {"steps": 10, "batch_size": 16, "log_every": 5, "eval_every": 5,
                  "warmup_steps": 2, "decay_steps": 10},
        "rules": {"v15h": {"kind": "bridge", "output": "rms",
                           "terms": {"lm": 1.0, "batch_div": 0.1}, **rule}}}}}
    return validate_params(raw, "test")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    ctx = RunContext(torch.device("cpu"), data=tmp_path_factory.mktemp("data"))
    prepare(params().studies.bridge.task, ctx.bridge_dir, ctx.device)  # type: ignore[union-attr]
    return ctx


def run(p: Params, ctx: RunContext, steps: int) -> tuple[dict[str, Any], list[Any]]:
    study, spec = BridgeStudy(), RunSpec("bridge", "v15h", 0)
    cal = study.calibrate(p, "v15h", ctx)
    trainer = study.build_trainer(p, spec, cal, ctx)
    logs = [{"step": s, **trainer.train_step(s, 1e-3)} for s in range(steps)]
    out = study.diagnose(p, spec, trainer, ctx, RunRecord(cal, logs))
    findings = run_all(pd.DataFrame(logs), {**out["extras"], "metrics": out["metrics"]})
    return out, findings


def test_baselines_and_an_untrained_bridge_learns_nothing(ctx: RunContext) -> None:
    p = params()
    cal = BridgeStudy().calibrate(p, "v15h", ctx)
    names = {(b["name"], b["metric"]) for b in cal["health"]["baselines"]}
    assert names == {("text", "test_accuracy"), ("text", "entity_transfer"),
                     ("primer_only", "test_accuracy"), ("primer_only", "entity_transfer"),
                     ("mismatched", "entity_transfer")}
    assert not any(b["judged"] for b in cal["health"]["baselines"] if b["name"] == "text")
    out, findings = run(p, ctx, steps=2)
    m = out["metrics"]
    for key in ("test_accuracy", "test_accuracy_shuffled", "entity_transfer",
                "entity_transfer_mismatched", "diversity", "batch_similarity", "rms_ratio",
                "lm_gain", "termgrad/lm", "termgrad/batch_div"):
        assert key in m and m[key] == m[key], key  # present and not NaN
    assert m["rms_ratio"] == pytest.approx(1.0, rel=0.05)  # V15h: RMS x scale at the target's
    detectors = {f.detector for f in findings}
    assert "learns_nothing" in detectors  # two steps cannot carry a question
    assert "non_finite" not in detectors and "config_drift" not in detectors
    assert "beats" in BridgeStudy.extra_markdown(pd.DataFrame([{"row": "v15h", **m}]))


def test_eval_primer_mismatch_is_flagged(ctx: RunContext) -> None:
    _, findings = run(params(eval_primer="Analysis of received thought vector:"), ctx, steps=1)
    (drift,) = [f for f in findings if f.detector == "config_drift"]
    assert drift.severity.name == "ERROR" and "Analysis" in drift.message


def test_missing_or_stale_data_is_one_clear_error(tmp_path: Path) -> None:
    empty = RunContext(torch.device("cpu"), data=tmp_path)
    with pytest.raises(BridgeDataError, match="stages.prepare --dataset bridge|stages.pretrain"):
        BridgeStudy().calibrate(params(), "v15h", empty)


def test_impossible_bridge_configs_name_the_key() -> None:
    with pytest.raises(ConfigError, match="fsq_levels"):
        params(output="fsq", fsq_levels=[4, 5])
    with pytest.raises(ConfigError, match="unique_div"):
        params(terms={"unique_div": 0.1})
