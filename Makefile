# One command to serve, one to test, one to check. Each creates .venv and installs what it needs:
# `make serve` only the runtime and the emulator's requirements, `make test`/`make check` the dev set.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SOURCES := serverless comfyui_emulator tests bench handler.py

.PHONY: serve test check format bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# What serving needs: the package (editable) with the emulator's extra.
$(VENV)/.serve-installed: $(BIN)/python pyproject.toml requirements.txt
	$(BIN)/pip install --quiet -e '.[emulator]'
	touch $@

# Tests, benchmarks and checks: requirements-dev.txt (it includes requirements.txt).
$(VENV)/.dev-installed: $(BIN)/python requirements.txt requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

# `PORT=9001 make serve` serves on another port (FC_CUSTOM_LISTEN_PORT), `EMULATOR_PORT=8189` moves
# the emulator off a ComfyUI already on 8188; a generated FILE_LINK_SECRET (kept in emulator-data/)
# makes download links work (GenStudio's API, ?output_url=true).
serve: $(VENV)/.serve-installed  ## the API on :9000 against the ComfyUI emulator (./bootstrap --help)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(if $(PORT),FC_CUSTOM_LISTEN_PORT=$(PORT)) exec ./bootstrap --emulator

test: $(VENV)/.dev-installed  ## the whole test suite
	$(BIN)/python -m pytest

check: $(VENV)/.dev-installed  ## formatting, lint and types, as CI runs them
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/mypy --strict serverless handler.py

format: $(VENV)/.dev-installed  ## apply ruff's formatting
	$(BIN)/ruff format $(SOURCES)

lint: $(VENV)/.dev-installed  ## check without the formatting
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/mypy --strict serverless handler.py

bench: $(VENV)/.dev-installed  ## benchmarks: prints a table of figures
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) emulator-data build *.egg-info .pytest_cache .mypy_cache .ruff_cache
