# cmbfe: the two commands of the README.
#   make reproduce [PROFILE=default|smoke|paper] [ONLY=05_evaluate] [FORCE=1]
#   make test
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= default
# The torch pair that installs on this project's machines (CUDA build on x86_64; runs on CPU too).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.cmbfe-installed

.PHONY: install reproduce test test-fast lint clean-smoke gpu-check lab ship

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

reproduce: $(STAMP)
	$(VENV)/bin/cmbfe reproduce --profile $(PROFILE) $(if $(ONLY),--only $(ONLY)) $(if $(FORCE),--force)

# Re-export models/ from the default study's runs (train them first: make reproduce) with a new second stage.
ship: $(STAMP)
	$(PY) -c "from cmbfe import config, study; from cmbfe.study import ship; c = config.load('$(PROFILE)'); \
	print(ship.ship_model(c, study.ensure_data(c)))"

test: $(STAMP)
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval-lax -p no:cacheprovider notebooks/

test-fast: $(STAMP)
	$(PY) -m pytest -q -x tests

lint: $(STAMP)
	$(VENV)/bin/ruff check cmbfe tests benchmarks

# JupyterLab on the notebooks with the project's kernel (the venv's python3): installs the `lab` extra once.
LAB_STAMP := $(VENV)/.cmbfe-lab
$(LAB_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,lab]"
	@touch $(LAB_STAMP)

lab: $(LAB_STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

# GPU readiness check (issue #13): one command on a CUDA machine, <= 8 min, writes results/gpu/check.{json,md}.
# Its CPU dry run (benchmarks/gpu_check.py --dry-run) is part of `make test` (tests/test_gpu_check.py).
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --out results/gpu

clean-smoke:
	rm -rf data/smoke runs/smoke results/smoke figures/smoke
