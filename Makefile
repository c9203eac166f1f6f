# Every target installs into .venv first when it is missing or older than pyproject.toml.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

export OMP_NUM_THREADS ?= 1

.PHONY: install demo test bench lint slurm-up slurm-down clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# The test suite also exercises the optional NeMo-Run executor (about 250 MB with ray), so
# `make test` adds that extra; `make demo` does not need it.
NEMO_STAMP := $(VENV)/.installed-nemo-run

$(NEMO_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,nemo-run]'
	@touch $(NEMO_STAMP)

DEMO_STORE ?= phi4_runs
PHI4 := $(VENV)/bin/phi4

# The tiny pipelines on this CPU: Phi-4-Mini's two text stages, then the nine-stage multimodal
# pipeline (its text stages are those two, already up to date), all trained for real; a rerun
# skips everything.
demo: $(STAMP)
	$(PHI4) run pipelines/phi4_mini.yaml --profile tiny --store $(DEMO_STORE)
	$(PHI4) run pipelines/phi4_multimodal.yaml --profile tiny --store $(DEMO_STORE)
	$(PHI4) status --store $(DEMO_STORE)
	$(PHI4) graph pipelines/phi4_multimodal.yaml --profile tiny --store $(DEMO_STORE)

# ... and the W&B and MLflow clients, whose tests log offline / to a local file store.
TRACKERS_STAMP := $(VENV)/.installed-trackers

$(TRACKERS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,trackers]'
	@touch $(TRACKERS_STAMP)

test: $(NEMO_STAMP) $(TRACKERS_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

slurm-up:
	bash scripts/slurm_local.sh up

slurm-down:
	bash scripts/slurm_local.sh down

clean:
	rm -rf $(VENV) phi4_runs .pytest_cache
