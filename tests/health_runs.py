"""Run the pipeline's own stages in-process (calibrate -> train segments -> diagnose) on tiny
configs, for the health acceptance tests: every failure they check is produced by the real
trainers, and every finding is read back from the diagnostics.json that ``diagnose`` wrote."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from models import io
from models.data.stories import generate_corpus
from models.data.tokens import train_codec, write_tokens
from models.ff.tasks.mnist1d import load_mnist1d
from models.pipeline import RunSpec, mnist1d_file, tokens_dir
from stages import calibrate, diagnose, train

PARAMS = Path("params.yaml")


@contextlib.contextmanager
def project(path: Path) -> Iterator[Path]:
    """``path`` as the working directory: the stages read and write paths relative to it
    (``contextlib.chdir`` from Python 3.11 on)."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


def write_corpus(stories: int = 300) -> int:
    """Char-level tokens of the generated story corpus (the default data source); returns V."""
    text = generate_corpus(stories, seed=1234)
    cut = int(0.9 * len(text))
    codec = train_codec("char", text, 512)
    out = tokens_dir()
    codec.save(out / "tokenizer.json")
    write_tokens(out / "train.bin", codec.encode(text[:cut]))
    write_tokens(out / "val.bin", codec.encode(text[cut:]))
    io.write_json(out / "meta.json", {"kind": "char", "vocab_size": codec.vocab_size})
    return codec.vocab_size


def write_mnist1d(num_samples: int = 2000) -> None:
    split = load_mnist1d(num_samples, 42)
    path = mnist1d_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=split.x_train.numpy(), y=split.y_train.numpy(),
             x_test=split.x_test.numpy(), y_test=split.y_test.numpy())


def params(studies: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"seeds": [0], "device": "cpu", "threads": 2,
            "data": {"tokenizer": {"kind": "char"}, "mnist1d": {"num_samples": 2000}},
            "studies": studies, **top}


def run(p: dict[str, Any], study: str, row: str, seed: int = 0) -> dict[str, Any]:
    """calibrate, train every segment, diagnose; returns diagnostics.json (``health`` inside).

    Stage bodies are called through ``__wrapped__`` so a GuardStop propagates as an exception.
    """
    PARAMS.write_text(yaml.safe_dump(p))
    calibrate.main.__wrapped__(study=study, row=row, params=PARAMS)  # type: ignore[attr-defined]
    cfg = p["studies"][study]["train"]
    n_seg = -(-cfg["steps"] // cfg["segment_steps"]) if "steps" in cfg else None
    segments = range(n_seg) if n_seg is not None else range(_ff_segments(p, study, row))
    for index in segments:
        train.main.__wrapped__(study=study, row=row, seed=seed, segment=index,  # type: ignore[attr-defined]
                               params=PARAMS)
    diagnose.main.__wrapped__(study=study, row=row, seed=seed, any_identity=False,  # type: ignore[attr-defined]
                              params=PARAMS)
    return io.read_json(RunSpec(study, row, seed).diagnostics)


def _ff_segments(p: dict[str, Any], study: str, row: str) -> int:
    from models.config import validate_params

    return validate_params(p).study(study).row_train(row).n_segments


def findings(diag: dict[str, Any], min_severity: str = "warning") -> list[dict[str, Any]]:
    order = ["info", "warning", "error", "fatal"]
    return [f for f in diag["health"] if order.index(f["severity"]) >= order.index(min_severity)]


def show(found: list[dict[str, Any]]) -> str:
    return "\n".join(f"{f['severity']} {f['detector']} [{f['run']}]: {f['message']}"
                     for f in found)
