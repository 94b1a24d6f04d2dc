#!/usr/bin/env bash
# device call: the gpu profile's 14k-step BP and BPTT rows (seed 0), resumed from the checkpoints
# carried in runs/ (if any); $1 = deadline s; BENCH=1 first runs bench.ep_step and the CUDA tests.
cd "$(dirname "$0")"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl || exit 9
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch, matplotlib; print(torch.__version__)"
export BPFREE_GIT_COMMIT=$(cat GITCOMMIT)
export BPFREE_OVERRIDES='{"studies": {"pc_seq": null, "dtp_wm": null, "rules_vision": null, "rules_ladder": null, "rules_lq": null}}'
export RUNS="eqt_lm/bptt/0 eqt_lm/bp/0"
ls .gpuin/runs.tar.* >/dev/null 2>&1 && cat .gpuin/runs.tar.* | tar xf - && echo "resumed from carried runs/" && du -sh runs
T0=$SECONDS
if [ -n "${BENCH:-}" ]; then
  timeout 200 python3 -m bench.ep_step --skip-eager-bptt --repeats 3 --out "$OUT/ep_step.json" > "$OUT/ep_step.txt" 2>&1; echo "bench rc=$?" >> "$OUT/ep_step.txt"
  (timeout 300 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_eqt_fast.py tests/test_health_ep_runs.py > "$OUT/cuda_tests.txt" 2>&1; echo "cuda tests rc=$?" >> "$OUT/cuda_tests.txt") &
fi
bench/run_profile.sh gpu $(( ${1:-540} - (SECONDS - T0) )); echo "run_profile rc=$?"
wait
tar cf - runs reports/gpu 2>/dev/null | split -b 15M - "$OUT/runs.tar."
ls -la "$OUT"; du -sh runs
tail -n 3 "$OUT/cuda_tests.txt" 2>/dev/null; tail -n 30 "$OUT/ep_step.txt" 2>/dev/null
grep -h "step" runs/logs/gpu/*seed0.txt | tail -n 12
