"""False-positive check: a healthy BP MLP recorded with the recorders raises nothing of warning
or worse; plus the Finding/Severity contract."""

from __future__ import annotations

import pandas as pd
import torch

from models.health import Finding, Severity, run_all
from models.health.recorders import activation_rms, grad_norms, slot_coverage, term_grad_norm


def _healthy_trace(steps: int = 300, log_every: int = 10) -> pd.DataFrame:
    torch.manual_seed(0)
    teacher = torch.randn(8, 3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 32),
                                torch.nn.GELU(), torch.nn.Linear(32, 3))
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    xv = torch.randn(256, 8)
    rows = []
    for step in range(1, steps + 1):
        x = torch.randn(64, 8)
        y = (x @ teacher).argmax(1)
        logging = step % log_every == 0
        with activation_rms(model if logging else torch.nn.Module()) as acts:
            hidden = model[:2](x)
            hidden.retain_grad()
            logits = model[2:](hidden)
        ce = torch.nn.functional.cross_entropy(logits, y)
        l2 = 1e-3 * sum(p.pow(2).sum() for p in params)
        row = {"step": step, "loss": (ce + l2).item(), "term/ce": ce.item(), "term/l2": l2.item()}
        if logging:
            row |= {"termgrad/ce": term_grad_norm(ce, params).norm,
                    "termgrad/l2": term_grad_norm(l2, params).norm}
        before = [p.detach().clone() for p in params]
        opt.zero_grad()
        (ce + l2).backward()
        opt.step()
        if not logging:
            continue
        row |= acts | grad_norms(model.named_parameters())
        row |= {f"update/{n}": (p.detach() - b).norm().item()
                for (n, p), b in zip(model.named_parameters(), before, strict=True)}
        row["coverage/hidden"] = slot_coverage(hidden.grad).fraction
        if step % 50 == 0:
            with torch.no_grad():
                row["val_loss"] = torch.nn.functional.cross_entropy(
                    model(xv), (xv @ teacher).argmax(1)).item()
        rows.append(row)
    return pd.DataFrame(rows)


def test_healthy_bp_mlp_raises_no_warning() -> None:
    trace = _healthy_trace()
    assert trace["loss"].iloc[-1] < 0.5 * trace["loss"].iloc[0]  # it did learn
    assert {"act/0", "grad/0.weight", "update/4.bias", "coverage/hidden"} <= set(trace.columns)
    found = run_all(trace, {"vocab_size": 3}, run="mlp")
    assert [f for f in found if f.severity >= Severity.WARNING] == [], [str(f) for f in found]


def test_severity_orders_and_parses() -> None:
    assert Severity.INFO < Severity.WARNING < Severity.ERROR < Severity.FATAL
    assert Severity.parse("error") is Severity.ERROR and str(Severity.FATAL) == "fatal"
    f = Finding("x", Severity.WARNING, "msg", "here").with_run("r1")
    assert f.to_dict()["run"] == "r1" and f.to_dict()["severity"] == "warning"
