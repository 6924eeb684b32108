# The project's commands. Each creates .venv and installs the project on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install serve bench test lint format clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(INSTALLED)

install: $(INSTALLED)

serve: $(INSTALLED)
	$(VENV)/bin/worldplan serve --host $${HOST:-127.0.0.1} --port $${PORT:-8000}

bench: $(INSTALLED)
	$(VENV)/bin/worldplan bench --out bench

test: $(INSTALLED)
	$(PY) -m pytest -q

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
