# `make example` runs the example services against the local broker; `make test` runs the checks.
# `make chaos` runs the chaos run (a few minutes, on a private RabbitMQ node; see the README).
# `make test-quick` is `make test` without the 3-node cluster tests and the short chaos run.
# All of them create .venv and install the project into it on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: example test test-quick lint chaos clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

example: $(VENV)/.installed
	$(PY) -m examples.demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check amqtask examples tests bench
	$(VENV)/bin/ruff format --check amqtask examples tests bench
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest

test-quick: lint
	$(PY) -m pytest -m "not cluster and not chaos"

chaos: $(VENV)/.installed
	$(PY) -m tests.chaos --duration 180

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
