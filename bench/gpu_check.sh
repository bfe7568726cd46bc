#!/usr/bin/env bash
# Run ON the GPU machine, in the repo root, with .gpu/ from bench/gpu_prepare.sh carried along.
# Installs the carried wheels into /tmp/site (nothing system-wide), then runs bench/gpu.py on
# both shapes with palate's defaults. Under 5 minutes on one H100/H200 (most of it compiling).
# Extra arguments go to bench/gpu.py.
set -euo pipefail
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
python3 bench/gpu.py "$@"
