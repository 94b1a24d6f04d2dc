"""Shared fixtures: a throw-away copy of the project running the tiny profile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from models.config import deep_merge

ROOT = Path(__file__).resolve().parents[1]
COPIED = ["models", "stages", "profiles", "Snakefile", "dvc.yaml", "pyproject.toml", ".dvcignore"]


def tiny_params(extra: dict | None = None) -> dict:
    """params.yaml merged with profiles/tiny.yaml (and ``extra``), as a plain dict."""
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    merged = deep_merge(base, yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text()))
    return deep_merge(merged, extra or {})


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the project's code in tmp_path with params.yaml = params + tiny profile; cwd."""
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, tmp_path / name)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BPFREE_PROFILE", raising=False)
    return tmp_path


def stage(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python -m stages.<args>`` in the current directory (the project copy)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr}")
    return result


def tool(name: str) -> str:
    """Path of a console script installed next to this Python (snakemake, dvc)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """Full-precision CUDA matmuls for one test, restored after it (the flag is process-wide,
    so a test that left it off would change every later GPU test's numerics)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small float64 nets: one torch thread is faster and keeps reductions in one order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
