# embedline: `make serve` installs into .venv, prepares the bundled model and starts Triton; `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch goes in first and pinned: with no torch present, a dependency asking for "torch" would pull the
# multi-GB CUDA build. On this project's machines torch==2.13.0 resolves to a local CPU wheel.
TORCH_SPEC ?= torch==2.13.0
# On a GPU machine: make install EXTRAS=gpu,train,dev (the gpu extra replaces serve + export).
EXTRAS ?= serve,export,train,dev
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install serve test bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

serve: install
	$(BIN)/embedline serve $(SERVE_ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/serving_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
