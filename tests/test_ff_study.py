"""The FF rule studies in the pipeline: bit-identical resume, config errors, held-out test split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.config import ConfigError, validate_params
from models.context import RunContext
from models.ff.tasks import Split
from models.pipeline import RunSpec, training_fingerprint
from models.studies import get_study, rules_ladder
from models.training import rng
from models.training.schedule import lr_at
from models.training.segments import Segment, run_segment

torch.set_num_threads(2)
CPU = RunContext(torch.device("cpu"))
TRAIN = {"batch_size": 16, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 3, "weight_decay": 0.0,
         "log_every": 5, "eval_every": 10, "eval_batches": 1}


def lq_params(segment_epochs: int | None = None, **extra: object):
    study = {"rows": ["credit_bridge", "dfa"], "epochs": 4, "segment_epochs": segment_epochs,
             "model": {"depth": 3, "d": 8}, "train": TRAIN,
             "task": {"d_in": 4, "d_out": 3, "n_train": 100, "n_test": 50},
             "rules": {"credit_bridge": {"kind": "credit_bridge", "d_value": 8,
                                         "warmup_frac": 0.25},
                       "dfa": {"kind": "dfa"}}, **extra}
    return validate_params({"seeds": [0], "studies": {"rules_lq": study}})


def ladder_params():
    study = {"rows": ["dfa"], "epochs": 2, "model": {"d": 16}, "train": TRAIN,
             "task": {"alphas": [1.0], "depths": [2], "n_train": 200, "n_test": 100},
             "rules": {"dfa": {"kind": "dfa"}}}
    return validate_params({"seeds": [0], "studies": {"rules_ladder": study}})


def train_run(params, spec: RunSpec, root: Path) -> dict:
    """Train every segment through the real driver; returns the last checkpoint's trainer state."""
    study = get_study(spec.study)
    cal = study.calibrate(params, spec.row, CPU)
    cfg = params.study(spec.study).row_train(spec.row)
    fp = {"config": training_fingerprint(params, spec)}  # a run identity (config part only)
    for k in range(cfg.n_segments):
        rng.seed_everything(123)  # a fresh process per segment: global RNG must not matter
        trainer = study.build_trainer(params, spec, cal, CPU)
        seg = Segment(k, k * cfg.segment_steps, cfg.segment_end(k), root / f"seg{k}.pt",
                      root / f"seg{k - 1}.pt" if k else None, root / f"seg{k}.jsonl")
        run_segment(trainer, seg, cfg, fp)
    return torch.load(root / f"seg{cfg.n_segments - 1}.pt", weights_only=False)["trainer"]


def assert_same(a: object, b: object, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where  # type: ignore[arg-type]
        for i, (x, y) in enumerate(zip(a, b, strict=True)):  # type: ignore[call-overload]
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where  # type: ignore[arg-type]
    else:
        assert a == b, where


@pytest.mark.parametrize("row", ["credit_bridge", "dfa"])
def test_resume_is_bit_identical(tmp_path: Path, row: str) -> None:
    one = lq_params()
    many = lq_params(segment_epochs=1)  # 4 segments, mid-warm-up boundary for credit_bridge
    spec = RunSpec("rules_lq", row, 0)
    assert many.study("rules_lq").row_train(row).n_segments == 4
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    state_one = train_run(one, spec, tmp_path / "a")
    state_many = train_run(many, spec, tmp_path / "b")
    assert_same(state_one["model"], state_many["model"], "model")
    assert_same(state_one["rule"], state_many["rule"], "rule")
    assert_same(state_one["batches"], state_many["batches"], "batches")


def test_bad_ff_key_names_it() -> None:
    with pytest.raises(ConfigError, match=r"rules_lq\.rules\.dfa\.bridge_lr"):
        lq_params(rules={"dfa": {"kind": "dfa", "bridge_lr": 1e-3},
                         "credit_bridge": {"kind": "credit_bridge"}})
    with pytest.raises(ConfigError, match="ep"):
        validate_params({"studies": {"rules_ladder": {"rows": ["ep"],
                                                      "rules": {"ep": {"kind": "ep"}}}}})
    with pytest.raises(ConfigError, match="nope"):
        lq_params(rows=["nope"])


def test_diagnose_reads_the_held_out_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    params = ladder_params()
    study = get_study("rules_ladder")
    spec = RunSpec("rules_ladder", "dfa", 0)
    trainer = study.build_trainer(params, spec, study.calibrate(params, "dfa", CPU), CPU)
    cfg = params.study("rules_ladder").row_train("dfa")
    for step in range(cfg.steps):
        trainer.train_step(step, lr_at(step, cfg))
    net = trainer.cells["a1_L2"].model  # type: ignore[attr-defined]
    _, _, d = study._cells(params, "dfa", 0, CPU.device)["a1_L2"]  # type: ignore[attr-defined]
    assert len(d.x_test) == 100 and len(d.x_fit) + len(d.x_val) == 200
    state = trainer.state_dict()
    before = study.diagnose(params, spec, trainer, CPU)["metrics"]
    acc = float((net(d.x_test).argmax(-1) == d.y_test).float().mean())
    assert before["test_accuracy@a1_L2"] == pytest.approx(acc)
    # Corrupt only the task's test labels: the test metric must move, the validation one not.
    trainer.load_state_dict(state)
    real = rules_ladder.make_ladder

    def corrupted(*args: object, **kwargs: object) -> Split:
        split = real(*args, **kwargs)  # type: ignore[arg-type]
        return Split(split.x_train, split.y_train, split.x_test, (split.y_test + 1) % 10)

    monkeypatch.setattr(rules_ladder, "make_ladder", corrupted)
    after = study.diagnose(params, spec, trainer, CPU)["metrics"]
    assert after["test_accuracy@a1_L2"] != pytest.approx(before["test_accuracy@a1_L2"])
    assert after["val_accuracy@a1_L2"] == pytest.approx(before["val_accuracy@a1_L2"])


def test_ladder_report_states_log_002_finding_with_numbers() -> None:
    import pandas as pd

    from models.studies.rules_ladder import RulesLadderStudy

    def row(name: str, seed: int, g1: tuple[float, float], g0: tuple[float, float]) -> dict:
        out = {"study": "rules_ladder", "row": name, "seed": seed}
        for a, (l2, l4) in ((1.0, g1), (0.0, g0)):
            for metric in ("gamma", "rho"):
                out[f"{metric}@a{a:g}_L2"], out[f"{metric}@a{a:g}_L4"] = l2, l4
        return out

    frame = pd.DataFrame([  # BP would lead everywhere: it is shown, never ranked
        *(row("bp", s, (0.99, 0.99), (0.99, 0.99)) for s in (0, 1)),
        *(row("dfa", s, (0.05, 0.06), (0.10, 0.10)) for s in (0, 1)),
        row("state_bridge", 0, (0.50, 0.30), (0.60, 0.50)),
        row("state_bridge", 1, (0.54, 0.34), (0.62, 0.52)),
        row("credit_bridge", 0, (0.60, 0.20), (0.20, 0.10)),
        row("credit_bridge", 1, (0.60, 0.30), (0.20, 0.10))])
    text = RulesLadderStudy().extra_markdown(frame)
    lines = {ln.split(" (")[0]: ln for ln in text.splitlines() if ln.startswith("- a=")}
    # a=1: CB mean (0.60 + 0.25) / 2 = 0.425 vs SB (0.52 + 0.32) / 2 = 0.42 -> leads, at L=2 only
    assert "credit_bridge 0.425, state_bridge 0.420, dfa 0.055" in lines["- a=1, gamma"]
    assert "**reproduced**" in lines["- a=1, gamma"]
    assert "credit_bridge leads at 1 of 2 depths (L=2)" in lines["- a=1, gamma"]
    assert "**reproduced**" in lines["- a=0, rho"]
    assert "state_bridge leads at 2 of 2 depths" in lines["- a=0, rho"]
    frame.loc[frame["row"] == "dfa", "gamma@a1_L2"] = 0.9
    lines = {ln.split(" (")[0]: ln for ln in RulesLadderStudy().extra_markdown(frame).splitlines()
             if ln.startswith("- a=")}
    assert "leader dfa -> **NOT reproduced**" in lines["- a=1, gamma"]
