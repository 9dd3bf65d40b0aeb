# Two entry points, each installing what it needs into ./.venv first:
#   make demo   -- the whole BEiT v2 pipeline at small scale, offline
#   make test   -- lint (ruff, mypy) + the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format benchmark clean

$(STAMP): setup.py constraints-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -c constraints-ci.txt -e ".[dev,deepspeed,tensorboard,plots]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py --output_dir demo_output

# transformers' own common test mixins come from its sdist (tests/fetch_transformers_tests.py: a no-op once fetched;
# without a registry the common tests skip, saying so).
# The suite runs on every core (pytest-xdist, at most 4 workers: each test already uses up to 2 threads).
test: $(STAMP)
	$(BIN)/python tests/fetch_transformers_tests.py
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest --numprocesses auto --maxprocesses 4

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

benchmark: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo_output benchmarks/out
