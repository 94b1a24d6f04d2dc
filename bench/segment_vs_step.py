"""Benchmark: a pipeline training segment's logged ms/step against the bare step of
``bench.ep_step``, side by side (the GPU-speed issue: the pipeline within 1.2x of the bench).

The segment must train the bench's configuration (same shape, T1 = t1max, fixed T2, no cosine
checkpoints; ``bench/gpu_check.sh`` sets it up). Its first logging window carries start-up cost
(compilation, CUDA-graph capture) and is reported apart; the ratio uses the median of the
steady windows.

    python -m bench.segment_vs_step --bench bench/results/ep_step.json \
        --log runs/eqt_lm/train/ep/seed0/log/seg0000.jsonl [--rule ep_tracking_aep --mode fast]

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def compare(bench: dict, rows: list[dict], rule: str, mode: str) -> dict:
    step_ms = bench["steps"][rule][mode]["ms_per_step"]
    windows = [r["time/ms_per_step"] for r in rows if "time/ms_per_step" in r]
    if len(windows) < 2:
        raise SystemExit("the segment log needs at least two logging windows")
    steady = statistics.median(windows[1:])
    return {"rule": rule, "mode": mode, "bench_ms": step_ms, "first_window_ms": windows[0],
            "steady_windows_ms": windows[1:], "pipeline_ms": steady,
            "ratio": steady / step_ms, "within_1.2x": steady / step_ms <= 1.2,
            "peak_mb": max(r.get("mem/peak_mb", 0.0) for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", type=Path, required=True, help="JSON written by bench.ep_step")
    ap.add_argument("--log", type=Path, required=True, help="a segment log (seg*.jsonl)")
    ap.add_argument("--rule", default="ep_tracking_aep")
    ap.add_argument("--mode", default="fast")
    ap.add_argument("--out", type=Path, default=Path("bench/results/segment_vs_step.json"))
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.log.read_text().splitlines() if line]
    res = compare(json.loads(args.bench.read_text()), rows, args.rule, args.mode)
    print(f"{'':<28}{'ms/step':>10}")
    print(f"{'bench ' + args.rule + ' ' + args.mode:<28}{res['bench_ms']:>10.1f}")
    print(f"{'pipeline, first window':<28}{res['first_window_ms']:>10.1f}")
    print(f"{'pipeline, steady (median)':<28}{res['pipeline_ms']:>10.1f}")
    print(f"ratio {res['ratio']:.3f} ({'within' if res['within_1.2x'] else 'NOT within'} 1.2x); "
          f"steady windows: {', '.join(f'{w:.1f}' for w in res['steady_windows_ms'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
