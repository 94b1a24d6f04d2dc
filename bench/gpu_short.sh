#!/usr/bin/env bash
# The short GPU protocol (profiles/gpu-short.yaml) stage by stage, without Snakemake: the same
# commands the Snakefile runs, the four rows trained side by side on one GPU, diagnosed one at a
# time (each diagnose runs an eager BPTT reference, ~28 GB at this shape), then the report, copied
# to reports/gpu-short/ with the runs' diagnostics and logs. With Snakemake installed the same is
#   BPFREE_PROFILE=gpu-short snakemake --cores 4 report
# Usage: bench/gpu_short.sh [rows...]   (PYTHON=... to pick the interpreter)
set -euo pipefail
export BPFREE_PROFILE=gpu-short PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
ROWS=${*:-bp bptt ep ep_noaep}
mkdir -p runs/logs
# Re-running resumes: finished stages are skipped, training continues from the last segment.
[ -f data/tokens/meta.json ] || { $PY -m stages.prepare && $PY -m stages.bpe; }
for r in $ROWS; do
  ( { [ -f "runs/eqt_lm/calibration/$r.json" ] || $PY -m stages.calibrate --study eqt_lm --row "$r"; } \
    && $PY -m stages.train --study eqt_lm --row "$r" --seed 0 ) >> "runs/logs/$r.txt" 2>&1 &
done
wait
for r in $ROWS; do
  [ -f "runs/eqt_lm/diagnostics/$r/seed0.json" ] \
    || $PY -m stages.diagnose --study eqt_lm --row "$r" --seed 0 >> "runs/logs/$r.txt" 2>&1
done
$PY -m stages.report
out=reports/gpu-short
rm -rf "$out" && mkdir -p "$out/runs"
cp -r reports/FINDINGS.md reports/metrics.json reports/figures "$out/"
for r in $ROWS; do
  mkdir -p "$out/runs/$r"
  cp runs/eqt_lm/diagnostics/"$r"/seed0.json "$out/runs/$r/diagnostics.json"
  cp runs/eqt_lm/calibration/"$r".json "$out/runs/$r/calibration.json"
  cp runs/eqt_lm/train/"$r"/seed0/log/*.jsonl "$out/runs/$r/"
  cp "runs/logs/$r.txt" "$out/runs/$r/stages.txt"
done
echo "${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" > "$out/COMMIT"
echo "BPFREE_PROFILE=gpu-short bench/gpu_short.sh $ROWS" > "$out/COMMAND"
