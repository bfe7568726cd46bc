#!/usr/bin/env bash
# Run ON the GPU machine (issue #20's GPU check; prepare with bench/gpu_prepare.sh): PPO under
# `accelerate launch` with the shipped configs, on a SmolLM2-135M-shaped random policy:
#   single — examples/accelerate/single_gpu.yaml, one process
#   ddp    — examples/accelerate/ddp.yaml with 2 processes (NCCL), only when ≥ 2 GPUs are there
# Each prints bench/gpu.py's table (episodes/s, rollout/update seconds); JSON lines in
# $OUT/gpu.jsonl, logs in $OUT/ddp.log.
# CPU smoke run of this script: SHAPE=tiny EXTRA="--tokenizer palate/assets/tiny-tokenizer
# --batch-size 4 --mini-batch-size 2 --new-tokens 8" CPU=1 bash bench/gpu_ddp.sh
set -uo pipefail
source bench/gpu_env.sh
out=${OUT:-/tmp}
log=$out/ddp.log
SHAPE=${SHAPE:-135m} EXTRA=${EXTRA:-}
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
[ -n "${CPU:-}" ] && export ACCELERATE_USE_CPU=1 && gpus=2
echo "GPUs: $gpus" | tee -a "$log"
launch() {  # launch SECONDS LABEL ACCELERATE-ARGS...
  local limit=$1 label=$2; shift 2
  echo "=== $label: accelerate launch $*" | tee -a "$log"
  timeout "$limit" python3 -m accelerate.commands.launch "$@" bench/gpu.py --shapes "$SHAPE" \
    --updates "${UPDATES:-2}" --label "$label" --policy-cache /tmp/palate-policies $EXTRA >>"$log" 2>&1
  echo "rc $?" | tee -a "$log"
  grep -A3 "^ *label " "$log" | tail -3
}
launch 200 single --config_file examples/accelerate/single_gpu.yaml
if [ "$gpus" -ge 2 ]; then
  launch 200 ddp2 --config_file examples/accelerate/ddp.yaml --num_processes 2
else
  echo "one GPU: the 2-process DDP run needs two (NCCL refuses two ranks on one device)" | tee -a "$log"
fi
