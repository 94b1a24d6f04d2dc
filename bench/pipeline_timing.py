"""Benchmark: wall time of the default pipeline end to end and of its no-op re-runs.

    python bench/pipeline_timing.py            # no-op timings in this checkout (outputs must exist)
    python bench/pipeline_timing.py --e2e      # fresh clone in a temp dir: `make report` timed,
                                               # then the no-op timings there

Prints a table and writes bench/results/pipeline_timing.json. The no-op numbers are medians of
--repeat runs measured side by side in one invocation.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{result.stdout}\n{result.stderr}")
    return elapsed, result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--e2e", action="store_true", help="time `make report` in a fresh clone")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = parser.parse_args()

    results: dict[str, object] = {"machine": platform.platform(), "cpus": _cpus()}
    workdir = ROOT
    if args.e2e:
        workdir = Path(tempfile.mkdtemp(prefix="bpfree-bench-")) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(workdir)], check=True)
        results["make_report_fresh_clone_s"], _ = timed(["make", "report"], workdir)
    bin_dir = workdir / ".venv" / "bin" if (workdir / ".venv").exists() else ROOT / ".venv" / "bin"
    smk, dvc = str(bin_dir / "snakemake"), str(bin_dir / "dvc")

    noop = [timed([smk, "--cores", "2", "report"], workdir) for _ in range(args.repeat)]
    if not all("Nothing to be done" in out for _, out in noop):
        raise SystemExit("snakemake was not a no-op: build the pipeline first (make report)")
    results["snakemake_noop_s"] = statistics.median(t for t, _ in noop)

    timed([dvc, "commit", "-f", "-q"], workdir)  # adopt the Snakemake-built outputs into dvc.lock
    dvc_noop = [timed([dvc, "repro"], workdir) for _ in range(args.repeat)]
    if any("Running stage" in out for _, out in dvc_noop):
        raise SystemExit("dvc repro was not a no-op")
    results["dvc_repro_noop_s"] = statistics.median(t for t, _ in dvc_noop)

    out = ROOT / "bench" / "results" / "pipeline_timing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'measure':<32} {'seconds':>10}")
    for key, value in results.items():
        if key.endswith("_s"):
            print(f"{key:<32} {value:>10.2f}")
    print(f"-> {out}")
    if args.e2e and not args.keep:
        shutil.rmtree(workdir.parent)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
