# Two commands set everything up on a fresh machine with Python 3.11:
#   make demo   -> virtual environment, install, then the main job on the bundled default
#   make test   -> virtual environment, install, then ruff, the architecture contract (import-linter) and
#                  the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/featurebank demo

test: lint
	PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/extraction.py --memory --repeat 3

# ruff, then the architecture in pyproject.toml: layers, no import cycles, public names only
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
