# Two commands do all the set-up on a fresh machine:
#   make study   -> creates .venv, installs the project, runs the default study
#   make test    -> creates .venv, installs the project (+dev), runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch by default. A GPU user installs a CUDA build first, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# Two test processes, each given whole files (so a module's shared study runs once): most slow
# tests wait on servers, heartbeats and retries as much as they compute, and two at a time fill
# 2 cores (one process 19:06, two 12:02-13:22 the same day). TEST_WORKERS=0 runs in one
# process, for a debugger. --durations: the 25 slowest tests close CI's log, for whoever keeps the
# suite under its 15 minutes.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: install study train test test-fast bench bench-ab report ui clean

# One stamp per torch spec, so `make install TORCH_SPEC=...` on an existing venv installs that build
# (before, the venv's stamp was up to date and nothing ran). --force-reinstall: pip keeps an
# installed torch of the same version whatever its build (+cpu for +cu124).
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)

$(TORCH_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --force-reinstall $(TORCH_SPEC)
	rm -f $(VENV)/.torch-* && touch $@

$(STAMP): $(TORCH_STAMP) pyproject.toml Makefile
	$(BIN)/python -m pip install -q -e ".[dev,slurm]"
	touch $(STAMP)

install: $(STAMP)

study: $(STAMP)
	$(BIN)/scaling-study $(ARGS)

train: $(STAMP)
	$(BIN)/scaling-train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

# The benchmark study at BASE (default HEAD) against this tree, alternating: a change's before/after ratio.
bench-ab: $(STAMP)
	$(BIN)/python -m benchmarks.ab --base $(or $(BASE),HEAD) $(ARGS)

report: $(STAMP)
	$(BIN)/scaling-report $(ARGS)

# One web worker and no job runner (MLflow 3's GenAI jobs, which a study never submits): ~8 s of
# CPU and 0.5 GB to start instead of ~50 s and 3 GB (README, "What MLflow holds").
ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
	  $(BIN)/mlflow ui --workers 1 --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db

# Everything the tool writes here, the study state in .studies with the record it points to (a resume
# of a study whose record is gone is refused); data/ (datasets) stays.
clean:
	rm -rf $(VENV) outputs multirun mlruns mlartifacts mlflow.db .studies reports bench-results .pytest_cache
