"""Time the CPU training step of the default ``eqt_lm`` rows (params.yaml, or a profile): the
real trainer (rule gradients + AdamW) on the prepared tokens, one torch thread, the first
``--warmup`` steps discarded, then the median and mean of ``--steps`` steps, and the nudged
phase's mean length where the row logs it.

An A/B of two commits is two runs of this script, one per checkout, side by side on one machine:

    python -m bench.ep_cpu_step --rows ep bptt bp --steps 20 --out bench/results/ep_cpu_step.json

Needs ``data/tokens`` (``python -m stages.prepare && python -m stages.bpe``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from models import io
from models.config import load_params
from models.context import RunContext
from models.studies.eqt_lm import build

OUT = Path("bench/results/ep_cpu_step.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", default=["ep", "bptt", "bp"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    study = load_params(args.params).study("eqt_lm")
    results = {}
    for row in args.rows:
        trainer = build(study, row, seed=0, relax=None, ctx=RunContext(torch.device("cpu")))
        lr = study.row_train(row).lr
        times, t2 = [], []
        for step in range(args.warmup + args.steps):
            t = time.perf_counter()
            stats = trainer.train_step(step, lr)
            if step >= args.warmup:
                times.append(time.perf_counter() - t)
                if "settle/nudged/iters" in stats:
                    t2.append(stats["settle/nudged/iters"])
        results[row] = {"median_ms": 1e3 * statistics.median(times),
                        "mean_ms": 1e3 * statistics.fmean(times), "steps": args.steps,
                        "nudge_iters": statistics.fmean(t2) if t2 else None}
    print(f"{'row':<10} {'median ms':>10} {'mean ms':>10} {'T2 mean':>8}")
    for row, r in results.items():
        t2s = f"{r['nudge_iters']:.1f}" if r["nudge_iters"] is not None else "-"
        print(f"{row:<10} {r['median_ms']:>10.1f} {r['mean_ms']:>10.1f} {t2s:>8}")
    io.write_json(args.out, {"params": str(args.params), "torch": torch.__version__,
                             "rows": results})


if __name__ == "__main__":
    main()
