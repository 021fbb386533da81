# medseg — set-up, demo and tests. Two commands on a fresh machine with Python 3.11:
#   make demo    # creates .venv, installs torch (CPU pin) + medseg, runs the demo
#   make test    # same set-up, then the test suite
PYTHON ?= python3.11
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# Extra pip flags for torch (e.g. TORCH_INDEX=--index-url https://download.pytorch.org/whl/cu124 on a GPU box).
TORCH_INDEX ?=
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.medseg-installed

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned, so resolving medseg's dependencies never pulls a CUDA build
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -e ".[dev]" torch==$(TORCH_VERSION)
	touch $(STAMP)

demo: install
	MEDSEG="$(BIN)/medseg" DEMO_DIR="$(DEMO_DIR)" bash scripts/demo.sh

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check medseg tests scripts
	$(BIN)/ruff format --check medseg tests scripts

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache build *.egg-info
