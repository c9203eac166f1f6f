# Every target installs into .venv first when it is missing or older than pyproject.toml.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# Test processes side by side (CI has 2 cores; each test runs one thread): files stay whole on
# one worker and the Slurm tests share one (tests/conftest.py). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

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

# The nine-stage Phi-4-Multimodal pipeline at the tiny size on this CPU, every stage trained
# for real and evaluated on held-out data; a rerun skips everything. Ends with each stage's
# loss, frozen check and evaluations, and where the drawing, metrics and evaluations are.
DEMO_PIPELINE := pipelines/phi4_multimodal.yaml

demo: $(STAMP)
	$(PHI4) run $(DEMO_PIPELINE) --profile tiny --store $(DEMO_STORE)
	$(PHI4) status --store $(DEMO_STORE)
	$(PHI4) graph $(DEMO_PIPELINE) --profile tiny --store $(DEMO_STORE)
	$(PHI4) graph $(DEMO_PIPELINE) --profile tiny --store $(DEMO_STORE) --format svg -o $(DEMO_STORE)/lineage.svg
	$(PY) scripts/demo_report.py $(DEMO_STORE) $(DEMO_PIPELINE) $(DEMO_STORE)/lineage.svg

# ... and the W&B and MLflow clients, whose tests log offline / to a local file store.
TRACKERS_STAMP := $(VENV)/.installed-trackers

$(TRACKERS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,trackers]'
	@touch $(TRACKERS_STAMP)

test: $(NEMO_STAMP) $(TRACKERS_STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

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
