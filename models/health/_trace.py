"""Reading a scalar trace: columns by prefix, per-step series without the rows that did not log."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd


def series(trace: pd.DataFrame, column: str) -> pd.Series:
    """Finite float values of one column indexed by step (NaN = not logged on that row)."""
    values = pd.to_numeric(trace[column], errors="coerce").astype(float)
    if "step" in trace.columns:
        values.index = trace["step"].to_numpy()
    return values[np.isfinite(values.to_numpy())]


def natural_key(name: str) -> list[object]:
    """'layer10' after 'layer9': digits compare as numbers, so depth order follows the names."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def named(trace: pd.DataFrame, prefix: str) -> dict[str, pd.Series]:
    """``{name: series}`` for every column ``prefix<name>`` with at least one logged value,
    in natural (depth) order of the names."""
    out = {c[len(prefix):]: series(trace, c) for c in trace.columns
           if isinstance(c, str) and c.startswith(prefix)}
    return {k: out[k] for k in sorted(out, key=natural_key) if len(out[k])}


def slots_text(indices: np.ndarray, limit: int = 6) -> str:
    """Compress slot indices into ranges: [0..31, 40, 42..47] -> '0-31, 40, 42-47'."""
    idx = np.unique(np.asarray(indices, dtype=int))
    if idx.size == 0:
        return "none"
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts, ends, strict=True)]
    more = f", ... ({len(parts) - limit} more ranges)" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more
