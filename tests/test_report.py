"""The report's table arithmetic on synthetic run results."""

from __future__ import annotations

import numpy as np
import pandas as pd

from models.report.tables import markdown_table, mean_pm_std, summarise


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for row, center in (("bp", 1.6), ("ep", 1.7)):
        for seed in range(3):
            rows.append({"study": "s", "row": row, "seed": seed, "run_dir": f"runs/s/{row}/{seed}",
                         "val": center + rng.normal(0, 0.01), "acc": rng.uniform()})
    rows.append({"study": "s", "row": "solo", "seed": 0, "run_dir": "x", "val": 2.0, "acc": 0.5})
    return pd.DataFrame(rows)


def test_summary_means_stds_and_n() -> None:
    frame = _frame()
    summary = summarise(frame, ["val", "acc"], ["ep", "bp", "solo", "absent"])
    assert list(summary.index) == ["ep", "bp", "solo"]  # params order, missing rows dropped
    for row in ("bp", "ep"):
        vals = frame.loc[frame.row == row, "val"].to_numpy()
        assert np.isclose(summary.loc[row, ("mean", "val")], vals.mean())
        assert np.isclose(summary.loc[row, ("std", "val")], vals.std(ddof=1))
        assert summary.loc[row, ("n", "val")] == 3
    assert np.isnan(summary.loc["solo", ("std", "val")])


def test_markdown_cells() -> None:
    frame = _frame()
    summary = summarise(frame, ["val"], ["bp", "solo"])
    table = markdown_table(summary, [("val", "val CE")], marks={"bp": " ⚠"})
    vals = frame.loc[frame.row == "bp", "val"]
    assert f"| bp ⚠ | {vals.mean():.3f} ± {vals.std(ddof=1):.3f} | 3 |" in table
    assert "| solo | 2.000 | 1 |" in table
    assert mean_pm_std(float("nan"), float("nan")) == "–"
