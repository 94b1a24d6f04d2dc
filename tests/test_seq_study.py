"""The pc_seq and dtp_wm studies through the real segment driver: resume is bit-exact with the
full state (precisions, LR gains, noise generator, inverses and their optimizer, data stream),
and the health detectors read what these runs log (settling at the cap, precision collapse and
oscillation)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from models.config import ConfigError, validate_params
from models.context import RunContext
from models.health import run_all
from models.pipeline import RunSpec, training_fingerprint
from models.studies import get_study
from models.training import rng
from models.training.segments import Segment, run_segment
from tests.test_ff_study import assert_same
from tests.test_seq_dtp import _corpus

torch.set_num_threads(1)
CPU = RunContext(torch.device("cpu"))
STEPS = 6
TRAIN = {"batch_size": 8, "steps": STEPS, "warmup_steps": 2, "decay_steps": STEPS,
         "log_every": 1, "eval_every": 3, "eval_batches": 1}
STUDIES = {
    "pc_seq": {"model": {"context": 3, "n_embd": 4, "width": 16, "depth": 2},
               "rules": {"pc": {"kind": "pc", "settle": {"max_iters": 20, "noise": 0.01,
                                                         "noise_half_life": 2},
                                "layer_rate": {"power": 0.5}},
                         "bp": {"kind": "bp"}}},
    "dtp_wm": {"model": {"block_size": 6, "n_embd": 4, "slots": 4, "slot_dim": 2, "latent": 2,
                         "dec_hidden": 8, "eval_samples": 2},
               "rules": {"dtp": {"kind": "dtp", "inverse": {"hidden": 8, "pretrain_steps": 3}},
                         "bp": {"kind": "bp"}}},
}


def _params(study: str, row: str, segment_steps: int, rule: dict | None = None) -> object:
    cfg = STUDIES[study]
    rules = {k: (v | (rule or {}) if k == row else v) for k, v in cfg["rules"].items()}
    return validate_params({"seeds": [0], "device": "cpu", "studies": {study: {
        "rows": [row], "model": cfg["model"], "rules": rules,
        "train": TRAIN | {"segment_steps": segment_steps}}}})


def _train(params: object, spec: RunSpec, root: Path) -> tuple[dict, list[dict]]:
    study = get_study(spec.study)
    cal = study.calibrate(params, spec.row, CPU)  # type: ignore[arg-type]
    cfg = params.study(spec.study).row_train(spec.row)  # type: ignore[attr-defined]
    fp = {"config": training_fingerprint(params, spec)}  # type: ignore[arg-type]
    rows: list[dict] = []
    for k in range(cfg.n_segments):
        rng.seed_everything(123)  # a fresh process per segment: the global RNG must not matter
        trainer = study.build_trainer(params, spec, cal, CPU)  # type: ignore[arg-type]
        seg = Segment(k, k * cfg.segment_steps, cfg.segment_end(k), root / f"seg{k}.pt",
                      root / f"seg{k - 1}.pt" if k else None, root / f"seg{k}.jsonl")
        rows += run_segment(trainer, seg, cfg, fp)
    state = torch.load(root / f"seg{cfg.n_segments - 1}.pt", weights_only=False)["trainer"]
    return state, rows


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path)
    return tmp_path


VOLATILE = ("time/", "mem/")


@pytest.mark.parametrize(("study", "row"), [("pc_seq", "pc"), ("pc_seq", "bp"),
                                            ("dtp_wm", "dtp"), ("dtp_wm", "bp")])
def test_resume_is_bit_identical(corpus: Path, study: str, row: str) -> None:
    spec = RunSpec(study, row, 0)
    (corpus / "a").mkdir()
    (corpus / "b").mkdir()
    whole, rows_whole = _train(_params(study, row, STEPS), spec, corpus / "a")
    parts, rows_parts = _train(_params(study, row, 2), spec, corpus / "b")  # 3 segments
    assert_same(whole, parts, "trainer")

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]

    assert strip(rows_whole) == strip(rows_parts)
    assert any("val_loss" in r for r in rows_whole)
    last = rows_whole[-1]
    if row == "pc":  # the state that must travel: precisions moved, gains adapted, noise on
        assert not torch.equal(whole["rule"]["precision"]["r"], whole["rule"]["precision"]["r_bar"])
        assert not torch.all(whole["layer_rates"]["gains"] == 1)
        for key in ("settle_iters", "residual", "settle/inference/tol", "settle/inference/cap",
                    "precision/h1", "target/h2", "pc/error/h1", "settle_iters_avg"):
            assert key in last, key
    if row == "dtp":
        assert whole["rule"]["inverses"] is not None and whole["rule"]["inv_opt"]["state"]
        for key in ("target/0_dec", "target/3_state_first", "coverage/state_slots",
                    "precision/state", "term/kl", "entropy", "kl"):
            assert key in last, key


def test_pc_settling_at_the_cap_is_flagged(corpus: Path) -> None:
    params = _params("pc_seq", "pc", STEPS, {"settle": {"max_iters": 2, "noise": 0.0}})
    _, rows = _train(params, RunSpec("pc_seq", "pc", 0), corpus)
    found = [f for f in run_all(pd.DataFrame(rows)) if f.detector == "settling_at_cap"]
    assert found and found[0].severity.name == "ERROR"
    params = _params("pc_seq", "pc", STEPS, {"settle": {"max_iters": 200, "noise": 0.0}})
    (corpus / "ok").mkdir()
    _, rows = _train(params, RunSpec("pc_seq", "pc", 0), corpus / "ok")
    assert not [f for f in run_all(pd.DataFrame(rows)) if f.detector == "settling_at_cap"]


def test_precision_collapse_and_oscillation_are_flagged_on_logged_keys(corpus: Path) -> None:
    _, rows = _train(_params("pc_seq", "pc", STEPS), RunSpec("pc_seq", "pc", 0), corpus)
    frame = pd.DataFrame(rows * 2)
    frame["step"] = range(1, len(frame) + 1)
    assert not [f for f in run_all(frame) if f.detector.startswith("precision")]
    collapsed = frame.copy()
    collapsed["precision/h1"] = [1.0 * 0.5 ** i for i in range(len(frame))]  # muted (log 001)
    assert [f for f in run_all(collapsed) if f.detector == "precision_collapse"]
    ringing = frame.copy()  # log 000: swings that grow late in training
    ringing["precision/h2"] = [1.0 + (0.001 if i < 6 else 0.5) * (-1) ** i
                               for i in range(len(frame))]
    assert [f for f in run_all(ringing) if f.detector == "precision_instability"]


def test_bad_keys_are_named() -> None:
    with pytest.raises(ConfigError, match=r"pc_seq\.rules\.pc\.settle\.tolerance"):
        _params("pc_seq", "pc", 2, {"settle": {"tolerance": 1e-3}})
    with pytest.raises(ConfigError, match="floor"):
        _params("dtp_wm", "dtp", 2, {"precision": {"init": 0.1, "floor": 0.2}})
