# Two commands set up a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
SERVE_ARGS ?=

.PHONY: install serve test test-all lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0  # CPU wheel; any other torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Ray + Serve on the embedded demo pair: gRPC on :9000, OpenAI-style HTTP on 127.0.0.1:8000; Ctrl-C stops.
serve: install
	RAY_USAGE_STATS_ENABLED=0 $(VENV)/bin/specray serve $(SERVE_ARGS)

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-all: install
	$(PY) -m pytest -q -m '' $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: install
	$(VENV)/bin/ruff check specray tests tools
