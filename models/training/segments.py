"""The segment driver: load state, train ``segment_steps`` steps, save everything atomically.

A segment is the unit of work that can be lost: segment ``i`` starts from the checkpoint of
segment ``i-1`` (or from initialisation), and writes its log and then its checkpoint, each by
rename. The checkpoint is written last, so its presence means the segment finished.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from models import io
from models.config import TrainConfig
from models.errors import GuardStop
from models.studies.base import Trainable
from models.training import checkpoint, rng
from models.training.schedule import lr_at


@dataclass(frozen=True)
class Segment:
    index: int
    start: int
    end: int
    ckpt: Path
    prev_ckpt: Path | None
    log: Path


def run_segment(trainer: Trainable, seg: Segment, cfg: TrainConfig, identity: dict[str, str],
                guard: Callable[[dict[str, float]], str | None] | None = None,
                label: str = "", config: dict[str, Any] | None = None) -> list[dict[str, float]]:
    """Train one segment; returns the logged rows (also written to ``seg.log``)."""
    if seg.prev_ckpt is not None:
        state = checkpoint.load(seg.prev_ckpt, identity=identity, step=seg.start)
        trainer.load_state_dict(state["trainer"])
        rng.restore(state["rng"])
    rows: list[dict[str, float]] = []
    # ms/step is timed per logging window of training steps only (evaluation and the logged
    # layer statistics are outside it), so a segment's first window carries its start-up cost
    # (e.g. CUDA graph capture) and later windows show the steady step time.
    clock, window_start = time.perf_counter(), seg.start
    with progress_bar() as bar:
        task = bar.add_task(f"{label} seg {seg.index}", total=seg.end - seg.start)
        for step in range(seg.start, seg.end):
            lr = lr_at(step, cfg)
            stats = trainer.train_step(step, lr)
            done = step + 1
            if done % cfg.log_every == 0 or done == seg.end:
                ms = 1000 * (time.perf_counter() - clock) / (done - window_start)
                row = {"step": done, "lr": lr, **stats, **trainer.layer_stats(),
                       "time/ms_per_step": ms, "mem/peak_mb": peak_memory_mb()}
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    row.update(trainer.evaluate())
                rows.append(row)
                if not bar.console.is_terminal:  # a batch job's log: one line per logged step
                    bar.console.print(status_line(label, row), highlight=False, soft_wrap=True)
                clock, window_start = time.perf_counter(), done
                reason = guard(row) if guard else None
                if reason:
                    raise GuardStop(f"{label}: live guard stopped segment {seg.index} at step "
                                    f"{done}: {reason}; last good checkpoint: {seg.prev_ckpt}")
            bar.advance(task)
    io.write_text(seg.log, "".join(json.dumps(r) + "\n" for r in rows))
    checkpoint.save(seg.ckpt, step=seg.end, identity=identity,
                    trainer=trainer.state_dict(), rng=rng.capture(), config=config)
    return rows


def peak_memory_mb() -> float:
    """Peak CUDA allocation when on a GPU, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_logs(log_dir: Path) -> list[dict[str, float]]:
    """All logged rows of a run, in step order."""
    rows: list[dict[str, float]] = []
    for path in sorted(log_dir.glob("seg*.jsonl")):
        rows.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    return rows


STATUS_KEYS = ("loss", "val_loss", "t2", "lambda", "residual", "time/ms_per_step")


def status_line(label: str, row: dict[str, float]) -> str:
    """One logged step as a line, for logs that are no terminal (a cluster job's or a GPU
    machine's output), where the transient progress bar is never drawn."""
    parts = [f"{k.split('/')[-1]} {row[k]:.4g}" for k in STATUS_KEYS if k in row]
    return f"{label} step {int(row['step'])}: " + ", ".join(parts)


def progress_bar() -> Progress:
    """The stages' progress bar (transient: gone once done, absent from non-terminal logs)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), transient=True)
