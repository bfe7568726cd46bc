#!/usr/bin/env bash
# Run ON the GPU machine (see bench/gpu_check.sh): the fast test suite with CUDA present, six
# processes (pytest-xdist, one test file per process). The slow tests need the SmolLM2 GGUF
# (94 MB, too big to carry) and are not run; PostgreSQL / Chromium tests skip there.
set -uo pipefail
source bench/gpu_env.sh
out=${OUT:-/tmp}
python3 -m pytest -q -p no:cacheprovider -n "${WORKERS:-6}" --dist loadfile --timeout 300 \
  "$@" 2>&1 | tee "$out/tests.log" | tail -40
