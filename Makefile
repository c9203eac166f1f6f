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

demo: $(STAMP)
	$(VENV)/bin/phi4 demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/run_all.py

slurm-up:
	bash scripts/slurm_local.sh up

slurm-down:
	bash scripts/slurm_local.sh down

clean:
	rm -rf $(VENV) phi4_runs .pytest_cache
