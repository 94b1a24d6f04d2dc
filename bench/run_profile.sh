#!/usr/bin/env bash
# Run a profile's whole pipeline without Snakemake (for machines that lack it, e.g. a GPU box
# with a bare image), with the Snakefile's own stage commands: prepare/bpe once, every row's
# calibration, then every run (study, row, seed) as one chain train -> diagnose, all chains side
# by side; on a machine with GPUs the chains are spread round-robin over them (in the order of
# RUNS: put the costliest first), on `device: cpu` profiles they run as CPU processes. Then the
# report, copied to reports/<profile>/ with each run's diagnostics, calibration, segment logs
# and stage output.
#
# Idempotent and resumable: current calibrations and diagnostics are kept (by run identity, as
# the stages define it) and training continues from the last valid segment, so a protocol can
# span several sessions on a machine with a time limit. A deadline (seconds, second argument)
# stops everything still running then (a killed segment costs only that segment) and exits 3.
#   bench/run_profile.sh PROFILE [DEADLINE_S]      e.g. bench/run_profile.sh gpu-short 540
# Env: PYTHON (interpreter), RUNS ("study/row/seed ..."; default: every run of the profile).
# With Snakemake the same is: snakemake --cores 8 report --config profile=PROFILE
set -uo pipefail
PROFILE=${1:?usage: bench/run_profile.sh PROFILE [DEADLINE_S]}
export BPFREE_PROFILE=$PROFILE PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEADLINE=$(( SECONDS + ${2:-1000000} ))
LOGS=runs/logs/$PROFILE
mkdir -p "$LOGS"
RUNS=${RUNS:-$($PY -c "from models.config import load_params; from models.pipeline import runs
print(' '.join(f'{s.study}/{s.row}/{s.seed}' for s in runs(load_params())))")} || exit 1
N_GPU=$(nvidia-smi -L 2>/dev/null | wc -l)

stop_at_deadline() {  # wait for the background jobs; at the deadline stop every stage, exit 3
  while [ -n "$(jobs -r)" ]; do
    if (( SECONDS >= DEADLINE )); then
      echo "deadline: stopping the stages still running (re-run to resume)"
      pkill -TERM -f "stages\.(calibrate|train|diagnose)"; sleep 5
      pkill -KILL -f "stages\.(calibrate|train|diagnose)"; wait; exit 3
    fi
    sleep 5
  done
  wait
}
gpu_of() { (( N_GPU > 0 )) && echo $(( $1 % N_GPU )) || echo ""; }

# the prepared data the profile's studies read (models.studies.STUDIES), made once
for data in $($PY -c "from models.config import load_params; from models.studies import study_datasets
print(' '.join(sorted({d for s in load_params().enabled_studies() for d in study_datasets(s)})))"); do
  case $data in
    tokens) [ -f data/tokens/meta.json ] || { $PY -m stages.prepare && $PY -m stages.bpe; } || exit 1 ;;
    mnist1d) [ -f data/mnist1d/data.npz ] || $PY -m stages.prepare --dataset mnist1d || exit 1 ;;
  esac
done

i=0
for row in $(printf '%s\n' $RUNS | cut -d/ -f1,2 | awk '!seen[$0]++'); do
  study=${row%/*} r=${row#*/}
  CUDA_VISIBLE_DEVICES=$(gpu_of $i) $PY -m stages.calibrate --study "$study" --row "$r" \
    --stale-only >> "$LOGS/${study}_$r.txt" 2>&1 &
  i=$(( i + 1 ))
done
stop_at_deadline

i=0
for run in $RUNS; do
  IFS=/ read -r study row seed <<< "$run"
  ( export CUDA_VISIBLE_DEVICES=$(gpu_of $i)
    $PY -m stages.train --study "$study" --row "$row" --seed "$seed" \
      && $PY -m stages.diagnose --study "$study" --row "$row" --seed "$seed" --stale-only
  ) >> "$LOGS/${study}_${row}_seed$seed.txt" 2>&1 &
  i=$(( i + 1 ))
done
stop_at_deadline
for run in $RUNS; do tail -n 1 "$LOGS/$(echo "$run" | sed 's#/#_#; s#/#_seed#').txt"; done
exec 9> runs/logs/report.lock && flock 9  # two profiles in one tree: one report at a time
$PY -m stages.report || exit 1

out=reports/$PROFILE
# only what this script writes: reports/<profile>/ also keeps the archived runs (<commit>/)
rm -rf "$out"/{FINDINGS.md,metrics.json,figures,runs,COMMIT,COMMAND} && mkdir -p "$out/runs"
cp -r reports/FINDINGS.md reports/metrics.json reports/figures "$out/"
for run in $RUNS; do
  IFS=/ read -r study row seed <<< "$run"
  name=${study}_${row}_seed$seed dst=$out/runs/${study}_${row}_seed$seed
  mkdir -p "$dst"
  cp "runs/$study/diagnostics/$row/seed$seed.json" "$dst/diagnostics.json"
  cp "runs/$study/calibration/$row.json" "$dst/calibration.json"
  cp runs/"$study"/train/"$row"/seed"$seed"/log/*.jsonl "$dst/"
  cp "$LOGS/$name.txt" "$dst/stages.txt"
done
echo "${BPFREE_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" > "$out/COMMIT"
echo "bench/run_profile.sh $PROFILE (RUNS=$RUNS; $N_GPU GPU(s))" > "$out/COMMAND"
echo "-> $out"
