#!/usr/bin/env bash
# one device call of the gpu-short protocol: RUNS and DEADLINE from the env / $1
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl || exit 9
export PYTHONPATH=/tmp/site
nvidia-smi -L; export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export BPFREE_GIT_COMMIT=4884326 BPFREE_OVERRIDES='{"studies": {"pc_seq": null, "dtp_wm": null}}'
export RUNS=${RUNS:-"eqt_lm/ep/0 eqt_lm/bptt/0 eqt_lm/bp/0 eqt_lm/ep_noaep/0"}
bench/run_profile.sh gpu-short "${1:-520}"; echo "run_profile rc=$?"
tar czf "$OUT/meta.tgz" reports/gpu-short/FINDINGS.md reports/gpu-short/metrics.json reports/gpu-short/figures reports/gpu-short/runs reports/gpu-short/COMMIT reports/gpu-short/COMMAND runs/logs runs/*/calibration runs/*/diagnostics runs/*/train/*/seed0/log data/tokens data/text 2>/dev/null
todo=""; for r in $RUNS; do IFS=/ read -r st row sd <<< "$r"
  [ -f runs/$st/diagnostics/$row/seed$sd.json ] || todo="$todo runs/$st/train/$row/seed$sd/ckpt"; done
echo "unfinished: $todo"; du -sh runs/*/train/*/seed0/ckpt
[ -n "$todo" ] && tar cf - $todo | split -b 15M - "$OUT/ckpt.tar."
ls -la "$OUT"
