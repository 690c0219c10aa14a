# One command to serve, one to test. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test bench lint clean

$(BIN)/activate: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(BIN)/activate

serve: $(BIN)/activate  ## the API on :9000 against the ComfyUI emulator
	PATH="$(CURDIR)/$(BIN):$$PATH" ./bootstrap --emulator

test: $(BIN)/activate  ## the whole test suite
	$(BIN)/python -m pytest

bench: $(BIN)/activate  ## benchmarks: prints a table of figures
	$(BIN)/python -m bench

lint: $(BIN)/activate
	$(BIN)/ruff check serverless tests handler.py
	$(BIN)/mypy --strict serverless handler.py

clean:
	rm -rf $(VENV) emulator-data .pytest_cache .mypy_cache .ruff_cache
