"""Aggregate per-run diagnostics into study tables (pandas does the arithmetic)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from models.config import fingerprint


def load_diagnostics(paths: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in paths]


def metrics_frame(diagnostics: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: study, row, seed, run_dir, then every scalar metric."""
    records = []
    for d in diagnostics:
        cfg = d["config"]
        records.append({"study": cfg["study"], "row": cfg["row"], "seed": cfg["seed"],
                        "run_dir": d["run_dir"], "identity": fingerprint(d["run_identity"]),
                        **{k: v for k, v in d["metrics"].items() if isinstance(v, (int, float))}})
    return pd.DataFrame.from_records(records)


def summarise(frame: pd.DataFrame, metrics: list[str], row_order: list[str]) -> pd.DataFrame:
    """Mean, sample std (ddof=1; NaN for n=1) and n of each metric per row, rows in params order."""
    grouped = frame.groupby("row")[metrics]
    out = pd.concat({"mean": grouped.mean(), "std": grouped.std(ddof=1),
                     "n": grouped.count()}, axis=1)
    order = [r for r in row_order if r in out.index]
    return out.loc[order]


def mean_pm_std(mean: float, std: float, digits: int = 3) -> str:
    if pd.isna(mean):
        return "–"
    if pd.isna(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(summary: pd.DataFrame, columns: list[tuple[str, str]],
                   marks: dict[str, str] | None = None) -> str:
    """Rows × metrics as 'mean ± std', with n per row and an optional mark (e.g. a health flag)."""
    marks = marks or {}
    header = ["row", *[label for _, label in columns], "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary.index:
        cells = [f"{row}{marks.get(row, '')}"]
        for key, _ in columns:
            cells.append(mean_pm_std(summary.loc[row, ("mean", key)],
                                     summary.loc[row, ("std", key)]))
        n = int(summary.loc[row, ("n", columns[0][0])])
        cells.append(str(n))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reference_rows(diagnostics: list[dict[str, Any]], columns: list[tuple[str, str]],
                   calibration_of: str) -> list[str]:
    """Table rows for the baselines marked ``table`` (a language model's n-gram counts) that the
    runs were judged against, measured once on the study's data at calibration: the value and
    its standard error over held-out tokens (not a spread over seeds), in the column of the
    baseline's metric (a held-out CE also under the best-CE column: a count model has no
    training curve). ``calibration_of`` names the file the numbers come from."""
    seen: dict[str, dict[str, dict[str, Any]]] = {}  # one table row per label: metric -> baseline
    for d in diagnostics:
        for b in d.get("baselines", []):
            if b.get("table"):
                seen.setdefault(b.get("label", b["name"]), {}).setdefault(b["metric"], b)
    lines = []
    for label, by_metric in seen.items():
        cells = [f"*{label}*"]
        for key, _ in columns:
            b = by_metric.get(key) or (by_metric.get("final_val_loss")
                                       if key == "best_val_loss" else None)
            cells.append(f"{b['value']:.3f} (SE {b['se']:.3f})" if b else "–")
        lines.append("| " + " | ".join([*cells, f"ref ({calibration_of})"]) + " |")
    return lines
