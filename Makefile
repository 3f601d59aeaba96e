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

.PHONY: install study train test test-fast bench report ui clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev,slurm]"
	touch $(STAMP)

install: $(STAMP)

study: $(STAMP)
	$(BIN)/scaling-study $(ARGS)

train: $(STAMP)
	$(BIN)/scaling-train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

report: $(STAMP)
	$(BIN)/scaling-report $(ARGS)

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) outputs multirun mlruns mlflow.db .pytest_cache
