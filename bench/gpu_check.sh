#!/usr/bin/env bash
# The GPU-speed checks in one go, on a machine with one or more CUDA GPUs:
#   1. python -m bench.ep_step: eager vs fast EP / BPTT / BP steps side by side (JSON + table);
#   2. the CUDA tests (fast-path gradients, the live guard on a CUDA run);
#   3. one pipeline segment of eqt_lm/ep at the bench's configuration (profile gpu-short with
#      T1 = t1max = 150, fixed T2 = 20, no cosine checkpoints), compared with the bench's step by
#      bench.segment_vs_step.
# With two GPUs, 1 runs on GPU 0 while 2 and 3 run on GPU 1 (no shared GPU, so no skewed timings);
# with one, they run one after the other. Needs data/external/shakespeare_gut.txt (README, GPU).
# Usage: OUT=bench/results bench/gpu_check.sh      (PYTHON=... picks the interpreter)
set -uo pipefail
OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
n_gpu=$(nvidia-smi -L | wc -l)
nvidia-smi -L > "$OUT/gpus.txt"

bench() { CUDA_VISIBLE_DEVICES=0 $PY -m bench.ep_step --out "$OUT/ep_step.json" > "$OUT/ep_step.txt" 2>&1; }
pipeline() {
  export CUDA_VISIBLE_DEVICES=$(( n_gpu > 1 ? 1 : 0 ))
  $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_eqt_fast.py tests/test_health_ep_runs.py
  export BPFREE_PROFILE=gpu-short
  export BPFREE_OVERRIDES='{"studies": {"eqt_lm": {"rows": ["ep"],
    "train": {"steps": 300, "segment_steps": 300, "eval_every": 300, "log_every": 50,
              "decay_steps": 300, "warmup_steps": 50},
    "rules": {"ep": {"relax": {"t1max": 150}, "nudge": {"adaptive_t2": false, "t2": 20},
                     "cos_every": 0}}}}}'
  rm -rf runs/eqt_lm
  $PY -m stages.prepare && $PY -m stages.bpe && $PY -m stages.calibrate --study eqt_lm --row ep \
    && $PY -m stages.train --study eqt_lm --row ep --seed 0
}

if (( n_gpu > 1 )); then
  bench & b=$!
  pipeline > "$OUT/pipeline.txt" 2>&1
  wait $b
else
  bench
  pipeline > "$OUT/pipeline.txt" 2>&1
fi
tail -n 30 "$OUT/ep_step.txt"
tail -n 8 "$OUT/pipeline.txt"
cp runs/eqt_lm/train/ep/seed0/log/seg0000.jsonl "$OUT/segment_log.jsonl"
$PY -m bench.segment_vs_step --bench "$OUT/ep_step.json" --log "$OUT/segment_log.jsonl" \
  --out "$OUT/segment_vs_step.json"
