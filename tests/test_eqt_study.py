"""The EP family as rows of the eqt_lm study: resume is bit-exact (weights, optimizer, controller
lambda, data stream) and bad rule keys are reported with the allowed keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import io
from models.config import ConfigError, validate_params
from models.context import RunContext
from models.data.tokens import train_codec, write_tokens
from models.pipeline import RunSpec, tokens_dir, training_fingerprint
from models.studies import get_study
from models.training.segments import Segment, run_segment

STEPS = 6


def _params(segment_steps: int, rule: dict | None = None) -> dict:
    ep = {"kind": "ep", "relax": {"eps": 0.25, "t1": 8, "t1max": 20},
          "nudge": {"beta": 0.05, "t2": 4, "aep": "tracking"}, "cos_every": 3,
          "stab": {"lam": 0.5, "floor": 0.05, "target": 1e-5}} | (rule or {})
    return {"seeds": [0], "device": "cpu", "data": {"tokenizer": {"kind": "char"}},
            "studies": {"eqt_lm": {
                "rows": ["ep"],
                "model": {"n_embd": 16, "n_head": 2, "n_layer": 1, "block_size": 8},
                "train": {"batch_size": 4, "steps": STEPS, "segment_steps": segment_steps,
                          "warmup_steps": 2, "decay_steps": STEPS, "log_every": 1,
                          "eval_every": 3, "eval_batches": 1},
                "rules": {"ep": ep}}}}


def _corpus(root: Path) -> None:
    text = "the cat sat on the mat. a dog ran to the log. " * 40
    codec = train_codec("char", text, 512)
    out = root / tokens_dir()
    codec.save(out / "tokenizer.json")
    write_tokens(out / "train.bin", codec.encode(text))
    write_tokens(out / "val.bin", codec.encode(text[::-1]))
    io.write_json(out / "meta.json", {"kind": "char", "vocab_size": codec.vocab_size})


def _train(segment_steps: int, run_dir: Path, calibration: dict,
           ctx: RunContext) -> tuple[dict, list[dict]]:
    params = validate_params(_params(segment_steps))
    spec = RunSpec("eqt_lm", "ep", 0)
    study = get_study("eqt_lm")
    cfg = params.study("eqt_lm").row_train("ep")
    fp = {"config": training_fingerprint(params, spec)}  # a run identity (config part only)
    rows: list[dict] = []
    root = run_dir
    for index in range(cfg.n_segments):
        trainer = study.build_trainer(params, spec, calibration, ctx)
        seg = Segment(index=index, start=index * cfg.segment_steps, end=cfg.segment_end(index),
                      ckpt=root / f"seg{index}.pt",
                      prev_ckpt=root / f"seg{index - 1}.pt" if index else None,
                      log=root / f"seg{index}.jsonl")
        rows += run_segment(trainer, seg, cfg, fp)
    return trainer.state_dict(), rows  # type: ignore[return-value]


def test_ep_row_resume_is_bit_exact(tmp_path: Path) -> None:
    # no chdir: the study reads its corpus from the context's data folder alone
    _corpus(tmp_path)
    ctx = RunContext(torch.device("cpu"), data=tmp_path / "data")
    calibration = {"relax": {"eps": 0.25, "t1": 8, "t1max": 20, "res_target": 1e-4, "chunk": 10}}
    whole, rows_whole = _train(STEPS, tmp_path / "one", calibration, ctx)
    parts, rows_parts = _train(2, tmp_path / "three", calibration, ctx)
    for name, p in whole["model"].items():
        assert torch.equal(p, parts["model"][name]), name
    assert whole["rule"]["controller"] == parts["rule"]["controller"]
    assert whole["rule"]["controller"]["lam"] != 0.5  # the controller moved: the check can fail
    assert torch.equal(whole["batches"]["generator"], parts["batches"]["generator"])
    keys = ("loss", "residual", "lambda", "settle_iters", "cos/global")
    assert [[r.get(k) for k in keys] for r in rows_whole] == \
        [[r.get(k) for k in keys] for r in rows_parts]
    assert any("cos/global" in r for r in rows_whole)
    assert any("val_loss" in r for r in rows_whole)
    for key in ("term/ce", "act/z_star", "grad/global", "update/block.attn.q.weight"):
        assert key in rows_whole[-1], key


@pytest.mark.parametrize(("rule", "expected"), [
    ({"betta": 0.1}, "unknown key 'studies.eqt_lm.rules.ep.betta'; allowed here: block, "
                     "cos_every, fast, kind, model, nudge, relax, stab, train"),
    ({"nudge": {"t22": 3}}, "unknown key 'studies.eqt_lm.rules.ep.nudge.t22'; allowed here: "
                            "accel, accel_m, adaptive_t2, aep, beta"),
    ({"stab": {"floor": 0.0}}, "studies.eqt_lm.rules.ep.stab.floor: Input should be greater than 0"),
    ({"nudge": {"beta": 0.0}}, "studies.eqt_lm.rules.ep.nudge.beta: Input should be greater than 0"),
    ({"nudge": {"aep": "both"}}, "studies.eqt_lm.rules.ep.nudge.aep: Input should be 'none', "),
    ({"relax": {"t1": 50, "t1max": 10}}, "t1max=10 must be >= t1=50"),
])
def test_ep_rule_config_errors(rule: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_params(_params(2, rule))
    assert expected in str(err.value)


def test_equilibrium_rule_on_the_fast_engine_trains_like_the_eager_path() -> None:
    """The EP row's rule with the fast engine (run eagerly on CPU, float64: no graphs, no
    compile) and without it, in the one trainer: the same logged keys and, to rounding, the same
    training; the EMA copy is evaluated through an engine of its own."""
    from models.config import TrainConfig
    from models.config.eqt import EPRule, FastConfig, NudgeConfig, StabiliserConfig
    from models.eqt.fast import FastEQ
    from models.studies.eqt_lm.equilibrium import Equilibrium
    from models.training.batches import Epochs
    from models.training.trainer import Trainer
    from tests.test_eqt_fast import make

    def run(fast: bool) -> tuple[Trainer, list[dict[str, float]], dict[str, float]]:
        model, _, _ = make(0)
        cfg = EPRule(nudge=NudgeConfig(beta=0.05, t2=8), cos_every=2,
                     stab=StabiliserConfig(lam=0.5, floor=0.05, target=1e-5))
        rule = Equilibrium(model, cfg)
        if fast:
            rule.fast = FastEQ(model, FastConfig(graphs=False, compile=False, nudge="lockstep"))
        tokens = torch.randint(0, 11, (16, 7), generator=torch.Generator().manual_seed(0))
        trainer = Trainer(model, rule, Epochs(tokens[:, :-1], tokens[:, 1:], 4, 0),
                          lambda m: {"val_loss": float(rule.loss(m)(tokens[:4, :-1],
                                                                    tokens[:4, 1:]))},
                          TrainConfig(lr=1e-2, min_lr=0.0, ema_decay=0.5))
        rows = [trainer.train_step(s, 1e-2) | trainer.layer_stats() for s in range(4)]
        return trainer, rows, trainer.evaluate()

    eager, rows_eager, ev_eager = run(False)
    fast, rows_fast, ev_fast = run(True)
    assert [r.keys() for r in rows_eager] == [r.keys() for r in rows_fast]
    assert "cos/global" in rows_fast[1] and "act/z_star" in rows_fast[-1]
    for a, b in zip(rows_eager, rows_fast, strict=True):
        for key in {"loss", "cos/global", "grad/global", "act/z_star", "lambda"} & a.keys():
            assert a[key] == pytest.approx(b[key], rel=1e-9), key
    # atol: the key bias's gradient is rounding noise (softmax ignores it), which Adam scales up
    for (name, p), q in zip(eager.model.named_parameters(), fast.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-8, msg=name)
    assert isinstance(fast.rule, Equilibrium) and fast.rule.fast_eval is not None
    assert fast.rule.fast_eval.model is fast.ema.shadow
    assert ev_fast["val_loss"] == pytest.approx(ev_eager["val_loss"], rel=1e-9)
