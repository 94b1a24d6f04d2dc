"""Device and thread selection (``device: auto`` picks CUDA when present)."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device: {name!r} requested but CUDA is not available; use auto or cpu")
    return torch.device(name)


def limit_threads(threads: int) -> None:
    """Snakemake runs several jobs at once; each keeps to its share of the cores."""
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(threads)
