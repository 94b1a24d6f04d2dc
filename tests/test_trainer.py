"""The one trainer (models.training.trainer): statistics before clipping, parameters without a
gradient left alone, LR gains per group, and a state that resumes bit-exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from models.config import TrainConfig
from models.config.seq import LayerRateConfig
from models.training.batches import Epochs
from models.training.trainer import Backprop, LearningRule, Trainer

CFG = TrainConfig(lr=0.1, min_lr=0.0, weight_decay=0.5, grad_clip=1.0)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def mse(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
    x, y = batch
    loss = (model(x) - y).pow(2).mean()
    return loss, {"loss": loss.item()}


class OnlyB(LearningRule):
    """A rule that gives ``b`` a large fixed gradient and ``a`` none; its state is a counter."""

    def __init__(self) -> None:
        self.calls = 0

    def grads(self, model: nn.Module, batch: Any, step: int) -> tuple[dict[str, Tensor], dict[str, float]]:
        self.calls += 1
        return ({n: torch.full_like(p, 10.0) for n, p in model.named_parameters()
                 if n.startswith("b.")}, {"act/b": 1.0, "calls": float(self.calls)})

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state["calls"]


def data() -> Epochs:
    gen = torch.Generator().manual_seed(1)
    return Epochs(torch.randn(40, 3, generator=gen), torch.randn(40, 2, generator=gen), 8, 2)


def test_grad_is_logged_before_clipping_and_gradless_parameters_are_left_alone() -> None:
    net = Net()
    a0 = net.a.weight.detach().clone()
    trainer = Trainer(net, OnlyB(), data(), lambda m: {}, CFG,
                      groups={"a": list(net.a.parameters()), "b": list(net.b.parameters())})
    stats = trainer.train_step(0, 0.1)
    layer = trainer.layer_stats()
    assert stats["grad_norm"] == pytest.approx(10.0 * (4 * 2 + 2) ** 0.5)  # 10 per element
    assert layer["grad/b"] == pytest.approx(stats["grad_norm"])  # not the clipped norm 1.0
    assert layer["act/b"] == 1.0 and stats["calls"] == 1.0 and "act/b" not in stats
    assert "grad/a" not in layer and "update/a" not in layer
    assert torch.equal(net.a.weight, a0)  # no gradient: not stepped (not even weight decay)
    assert layer["update/b"] > 0


def test_backprop_matches_autograd_and_layer_rates_move_the_groups_lr() -> None:
    net, ref = Net(), Net()
    batches = data()
    trainer = Trainer(net, Backprop(mse), batches, lambda m: {}, CFG,
                      groups={"a": list(net.a.parameters()), "b": list(net.b.parameters())},
                      layer_rate=LayerRateConfig(power=1.0))
    x, y = data().next(0)
    mse(ref, (x, y))[0].backward()
    stats = trainer.train_step(0, 0.1)
    assert trainer.layer_stats()["grad/a"] == pytest.approx(
        sum(p.grad.pow(2).sum() for p in ref.a.parameters()).sqrt().item())  # type: ignore[union-attr]
    gains = {k: v for k, v in stats.items() if k.startswith("lr_gain/")}
    assert set(gains) == {"lr_gain/a", "lr_gain/b"} and gains["lr_gain/a"] != gains["lr_gain/b"]
    trainer.train_step(1, 0.1)
    lrs = {g["unit"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["a"] != lrs["b"]


def test_state_dict_resumes_bit_exactly() -> None:
    def make() -> Trainer:
        net = Net()
        return Trainer(net, Backprop(mse), data(), lambda m: {}, CFG.model_copy(
            update={"ema_decay": 0.9}), groups={"a": list(net.a.parameters()),
                                                "b": list(net.b.parameters())},
            layer_rate=LayerRateConfig(power=0.5))

    whole = make()
    for step in range(12):
        whole.train_step(step, 0.05)
    first = make()
    for step in range(7):  # mid-epoch (5 steps an epoch)
        first.train_step(step, 0.05)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for step in range(7, 12):
        resumed.train_step(step, 0.05)
    for key in ("model", "ema", "layer_rates", "batches"):
        a, b = whole.state_dict()[key], resumed.state_dict()[key]
        flat = a["shadow"] if key == "ema" else a
        for k, v in flat.items():
            other = (b["shadow"] if key == "ema" else b)[k]
            assert torch.equal(v, other) if isinstance(v, Tensor) else v == other, (key, k)
