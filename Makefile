# The project's commands. Each creates .venv and installs the project on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install serve bench test test-fast lint format clean docs wheelhouse

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	# openpi's own client, which the stream's tests drive: it pins numpy<2, yet the parts
	# a client uses (msgpack-numpy, the WebSocket policy) run on numpy 2.
	$(PY) -m pip install --quiet --no-deps "openpi-client==0.1.2"
	touch $(INSTALLED)

install: $(INSTALLED)

serve: $(INSTALLED)
	$(VENV)/bin/worldplan serve --host $${HOST:-127.0.0.1} --port $${PORT:-8000}

bench: $(INSTALLED)
	$(VENV)/bin/worldplan bench --out bench

# The suite on every core (pytest-xdist; each test module on one worker, so that its
# servers and bundles are made once), then the compose stack's test alone: its replicas
# compile on the cores, which would starve the timing-bound tests beside it.
# test-fast leaves out the tests marked slow.
test: $(INSTALLED)
	$(PY) -m pytest -q -n auto --dist loadscope -m "not docker" --durations=10
	$(PY) -m pytest -q -m docker

test-fast: $(INSTALLED)
	$(PY) -m pytest -q -n auto --dist loadscope -m "not slow"

docs: $(INSTALLED)
	$(VENV)/bin/mkdocs build --strict

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Every wheel the image needs (docker/Dockerfile installs from wheelhouse/ when it is there),
# so that a build needs no package index: an air-gapped lab's way. Made with the Python of
# .venv, which must be the image's (3.11, like Debian bookworm's and python:3.11-slim's);
# made again only when pyproject.toml changes. `make wheelhouse EXTRAS=cuda` adds jax[cuda12].
WHEELHOUSE := wheelhouse
EXTRAS ?=
WHEELHOUSE_MADE := $(WHEELHOUSE)/.made$(if $(EXTRAS),-$(EXTRAS))

wheelhouse: $(WHEELHOUSE_MADE)

$(WHEELHOUSE_MADE): pyproject.toml $(INSTALLED)
	rm -rf $(WHEELHOUSE)
	# pip resolves for the Python that runs it: async-timeout is what redis needs on
	# Python before 3.11.3, such as Debian bookworm's 3.11.2
	$(PY) -m pip wheel --quiet --wheel-dir $(WHEELHOUSE) "setuptools>=69" \
		"async-timeout>=4.0.3" ".$(if $(EXTRAS),[$(EXTRAS)])"
	rm -f $(WHEELHOUSE)/worldplan-*.whl  # the image installs the project from its source
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
