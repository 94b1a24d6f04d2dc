#!/usr/bin/env bash
# device call: the CUDA tests beside the gpu-short runs named in RUNS (deadline $1 s)
cd "$(dirname "$0")"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl || exit 9
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
if [ -n "${CUDA_TESTS:-}" ]; then
  (python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_eqt_fast.py tests/test_health_ep_runs.py > "$OUT/cuda_tests.txt" 2>&1; echo "cuda tests rc=$?" >> "$OUT/cuda_tests.txt") &
fi
./gpu_call.sh "${1:-500}"
wait
tail -n 3 "$OUT/cuda_tests.txt" 2>/dev/null
grep -h "step" runs/logs/gpu-short/*seed0.txt | tail -n 40
