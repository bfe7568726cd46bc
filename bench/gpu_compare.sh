#!/usr/bin/env bash
# Run ON the GPU machine (see bench/gpu_check.sh): the same PPO settings three ways, each in its
# own process, so one failure leaves the others' numbers:
#   before — the code in .gpu/before (bench/gpu_prepare.sh with BEFORE=<rev>), 135M and 1.7B
#   eager  — this code with nothing compiled (one forward per minibatch, no host syncs), 135M
#   after  — this code's defaults on a GPU (compiled layers, static-cache decoding), both shapes
# Results: a table per run and JSON lines in $OUT/gpu.jsonl; logs in $OUT/compare.log.
set -uo pipefail
source bench/gpu_env.sh
out=${OUT:-/tmp}
log=$out/compare.log
# CPU smoke run of this script: SHAPES=tiny SHAPE1=tiny EXTRA="--tokenizer palate/assets/tiny-tokenizer
# --batch-size 4 --mini-batch-size 2 --new-tokens 8"
SHAPES=${SHAPES:-135m,1.7b} SHAPE1=${SHAPE1:-135m} EXTRA=${EXTRA:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tee -a "$log"
run() {  # run SECONDS ARGS...
  local limit=$1; shift
  echo "=== $*" | tee -a "$log"
  timeout "$limit" python3 bench/gpu.py --policy-cache /tmp/palate-policies --updates "${UPDATES:-2}" $EXTRA "$@" \
    >>"$log" 2>&1
  echo "rc $?" | tee -a "$log"
  grep -A3 "^ *label " "$log" | tail -3
}
run 170 --label before --palate .gpu/before --shapes "$SHAPES"
run 60 --label eager --shapes "$SHAPE1" --set compile.training=false --set compile.generation=dynamic
run 260 --label after --shapes "$SHAPES"
echo "--- summary"
python3 - "$out/gpu.jsonl" <<'PY'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
for r in rows:
    print(f"{r['label']:>7} {r['shape']:>5} eps/s {r['episodes_per_s']:6.2f}  rollout {r['rollout_s_per_update']:5.2f} s"
          f"  update {r['update_s_per_update']:5.2f} s  gen tok/s {r['generation_tokens_per_s']:7.0f}  warm-up {r['warmup_s']:5.1f} s")
PY
