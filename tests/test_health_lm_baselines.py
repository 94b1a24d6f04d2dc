"""False positives on eqt_lm's reference rows: every detector is silent (nothing of warning or
worse) on the BPTT control and on the BP transformer baseline, trained and diagnosed by the
pipeline's own stages at a CPU-sized config (same settings as test_health_ep_converged.py), but
for the true "learns no context" of so small a budget (see there)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_health_ep_converged import check_silent


@pytest.mark.parametrize(("row", "steps", "lr"), [("bptt", 60, 3e-2), ("bp", 200, 3e-3)])
def test_reference_rows_raise_nothing(row: str, steps: int, lr: float, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    check_silent(row, steps, lr)
