"""Planted log-004 bridge bugs: soft tokens identical across inputs (mode collapse), identical
generated outputs, a LayerNorm-scaled bridge feeding 33x the target embedding RMS, and a
train/eval primer mismatch."""

from __future__ import annotations

import pandas as pd
import torch

from models.health import Severity, run_all
from models.health.config import config_drift
from models.health.outputs import magnitude_mismatch, output_collapse
from models.health.recorders import rms

K, D = 4, 32


class Resampler(torch.nn.Module):
    """K learned queries cross-attend to the source; ``mask_bug`` masks every source position but
    one padding slot that is zero for all inputs, so the output no longer depends on the input."""

    def __init__(self, mask_bug: bool, scale_fix: bool) -> None:
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(K, D))
        self.attn = torch.nn.MultiheadAttention(D, 4, batch_first=True)
        self.norm = torch.nn.LayerNorm(D)
        self.mask_bug, self.scale_fix = mask_bug, scale_fix
        self.out_scale = torch.nn.Parameter(torch.tensor(0.03))

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        src = torch.cat([torch.zeros_like(src[:, :1]), src], dim=1)  # slot 0: padding
        mask = torch.zeros(src.shape[:2], dtype=torch.bool)
        if self.mask_bug:
            mask[:, 1:] = True
        q = self.queries.expand(src.shape[0], -1, -1)
        out = self.norm(q + self.attn(q, src, src, key_padding_mask=mask)[0])
        return torch.tanh(out) * self.out_scale if self.scale_fix else out


def _soft_tokens(mask_bug: bool, scale_fix: bool = True) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return Resampler(mask_bug, scale_fix)(torch.randn(6, 10, D))


def test_identical_soft_tokens_collapse() -> None:
    (f,) = output_collapse(_soft_tokens(mask_bug=True).numpy(), name="soft_tokens")
    assert f.severity == Severity.ERROR and f.evidence["spread"] < 1e-6
    assert "soft_tokens" in f.message


def test_input_dependent_soft_tokens_are_clean() -> None:
    assert output_collapse(_soft_tokens(mask_bug=False).numpy(), name="soft_tokens") == []


def test_identical_generations_collapse() -> None:
    template = "1. Which of the following is not a characteristic of a simple interest?"
    (f,) = output_collapse([template] * 20)
    assert f.severity == Severity.ERROR and f.evidence["unique_fraction"] == 1 / 20
    assert output_collapse([f"answer {i}" for i in range(20)]) == []


def test_layernorm_bridge_is_33x_too_loud() -> None:
    embeds = torch.nn.Embedding(100, D)
    torch.nn.init.normal_(embeds.weight, std=0.03)  # the target LM's input embedding scale
    fed = rms(_soft_tokens(mask_bug=False, scale_fix=False))
    (f,) = magnitude_mismatch({"bridge->tgt_embed": (fed, rms(embeds.weight))})
    assert f.severity == Severity.ERROR and 25 < f.evidence["ratio"] < 40
    assert "bridge->tgt_embed" in f.message and "too loud" in f.message
    fixed = rms(_soft_tokens(mask_bug=False, scale_fix=True))
    assert magnitude_mismatch({"bridge->tgt_embed": (fixed, rms(embeds.weight))}) == []


def _configs(eval_primer: str) -> tuple[dict, dict]:
    train = {"prompt": {"primer": "Answer: ", "soft_tokens": K}, "seed": 0, "max_new_tokens": 32}
    evaluation = {"prompt": {"primer": eval_primer, "soft_tokens": K}, "seed": 1,
                  "max_new_tokens": 32}
    return train, evaluation


def test_primer_drift_is_found() -> None:
    train, evaluation = _configs("Analysis of received thought vector: ")
    (f,) = config_drift(train, evaluation)
    assert f.severity == Severity.ERROR and "prompt.primer" in f.message
    assert "'Answer: '" in f.message and "thought vector" in f.message


def test_matching_primer_is_clean() -> None:
    assert config_drift(*_configs("Answer: ")) == []  # seed differs but is ignored


def test_run_all_reads_output_extras_worst_first() -> None:
    train, evaluation = _configs("Analysis of received thought vector: ")
    extras = {"soft_tokens": _soft_tokens(mask_bug=True).numpy(), "outputs": ["same"] * 5,
              "rms": {"bridge->tgt_embed": (1.0, 0.03)}, "config_train": train,
              "config_eval": evaluation}
    found = run_all(pd.DataFrame({"step": [0]}), extras, run="bridge/seed0")
    assert {f.detector for f in found} == {"output_collapse", "magnitude_mismatch",
                                           "config_drift"}
    assert [int(f.severity) for f in found] == sorted((int(f.severity) for f in found),
                                                      reverse=True)
    assert all(f.run == "bridge/seed0" for f in found)
