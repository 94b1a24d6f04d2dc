#!/usr/bin/env bash
# The short GPU protocol (profiles/gpu-short.yaml) without Snakemake (the device image lacks it):
# the Snakefile's own stage commands. Every run (study, row, seed) is one chain calibrate ->
# train -> diagnose, all chains side by side, spread round-robin over the visible GPUs in the
# order of RUNS (costliest first, so the GPUs get similar loads); then the report, copied to
# reports/gpu-short/ with each run's diagnostics, calibration, segment logs and stage output.
#
# Idempotent and resumable: finished stages are skipped and training continues from the last
# segment, so the protocol can span several device calls. A deadline (seconds, first argument)
# stops everything still running then (a killed segment costs only that segment) and exits 3.
#   bench/gpu_short.sh [DEADLINE_S]        (PYTHON=... picks the interpreter; OUT=... a copy dir)
# With Snakemake installed the same stages run as: snakemake --cores 8 --config profile=gpu-short report
set -uo pipefail
export BPFREE_PROFILE=gpu-short PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEADLINE=$(( SECONDS + ${1:-100000} ))
RUNS=${RUNS:-"eqt_lm/ep eqt_lm/ep_noaep eqt_lm/bptt dtp_wm/dtp pc_seq/pc eqt_lm/bp pc_seq/bp dtp_wm/bp"}
N_GPU=$(nvidia-smi -L 2>/dev/null | wc -l); (( N_GPU > 0 )) || N_GPU=1
mkdir -p runs/logs

[ -f data/tokens/meta.json ] || { $PY -m stages.prepare && $PY -m stages.bpe; } || exit 1

chain() {  # study row gpu: calibrate (once), train the missing segments, diagnose (once)
  local study=$1 row=$2 diag=runs/$1/diagnostics/$2/seed0.json
  export CUDA_VISIBLE_DEVICES=$3
  [ -f "$diag" ] && return 0
  { [ -f "runs/$study/calibration/$row.json" ] || $PY -m stages.calibrate --study "$study" --row "$row"; } \
    && $PY -m stages.train --study "$study" --row "$row" --seed 0 \
    && $PY -m stages.diagnose --study "$study" --row "$row" --seed 0
}

i=0
for run in $RUNS; do
  ( setsid bash -c "$(declare -f chain); PY=$PY; chain ${run%/*} ${run#*/} $(( i % N_GPU ))" \
      >> "runs/logs/${run/\//_}.txt" 2>&1 ) &
  i=$(( i + 1 ))
done
while [ -n "$(jobs -r)" ]; do
  if (( SECONDS >= DEADLINE )); then
    echo "deadline: stopping the stages still running (re-run to resume)"
    pkill -TERM -f "stages\.(calibrate|train|diagnose)"; sleep 5; pkill -KILL -f "stages\.(calibrate|train|diagnose)"
    wait; exit 3
  fi
  sleep 5
done
wait
for run in $RUNS; do tail -n 2 "runs/logs/${run/\//_}.txt"; done
$PY -m stages.report || exit 1

out=reports/gpu-short
rm -rf "$out" && mkdir -p "$out/runs"
cp -r reports/FINDINGS.md reports/metrics.json reports/figures "$out/"
for run in $RUNS; do
  study=${run%/*} row=${run#*/} dst=$out/runs/${run/\//_}
  mkdir -p "$dst"
  cp "runs/$study/diagnostics/$row/seed0.json" "$dst/diagnostics.json"
  cp "runs/$study/calibration/$row.json" "$dst/calibration.json"
  cp runs/"$study"/train/"$row"/seed0/log/*.jsonl "$dst/"
  cp "runs/logs/${run/\//_}.txt" "$dst/stages.txt"
done
echo "${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" > "$out/COMMIT"
echo "bench/gpu_short.sh (BPFREE_PROFILE=gpu-short; RUNS=$RUNS; $N_GPU GPU(s))" > "$out/COMMAND"
echo "-> $out"
