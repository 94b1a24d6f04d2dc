"""Learning-curve plots (matplotlib, Agg backend: works headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from models import io  # noqa: E402


def curves_plot(curves: pd.DataFrame, metric: str, path: Path, title: str,
                ref: float | None = None, ref_label: str = "") -> bool:
    """Mean over seeds with a min–max band, one line per row. Returns False if nothing to plot."""
    data = curves.dropna(subset=[metric]) if metric in curves else curves.iloc[0:0]
    if data.empty:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for row, group in data.groupby("row", sort=False):
        stats = group.groupby("step")[metric].agg(["mean", "min", "max"])
        ax.plot(stats.index, stats["mean"], label=str(row))
        ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.2)
    if ref is not None:
        ax.axhline(ref, color="grey", linestyle="--", linewidth=1, label=ref_label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True
