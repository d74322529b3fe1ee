# capfilt — the two commands a fresh machine needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.capfilt-installed

# Offline and quiet everywhere (see README, "Telemetry").
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
# DeepSpeed's JIT-built ops live in the virtualenv, pre-built by `make setup` (see below).
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup data run test test-fast bench clean

setup: $(STAMP)

# Idempotent: re-installs only when the lock file or the package metadata change. The virtualenv
# takes ~7 GB (torch's CUDA wheels); no pip cache, so a download needs no second copy on disk.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-cache-dir -r requirements.lock
	$(BIN)/pip install --quiet --no-cache-dir --no-deps --no-build-isolation -e .
	$(BIN)/python -c "from components.distributed import prebuild_ops; prebuild_ops()"
	touch $(STAMP)

# The embedded corpus, drawn from its seed when missing (pinned by data.dvc).
data: setup
	@test -d data || $(BIN)/capfilt synth --out data --seed 0

run: setup data
	$(BIN)/capfilt run

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not integration"

bench: setup
	$(BIN)/python benchmarks/ingest.py --quick
	$(BIN)/python -m benchmarks.train_step --quick
	$(BIN)/python benchmarks/bootstrap.py --quick --scaling

clean:
	rm -rf outputs .pytest_cache
