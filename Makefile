# refloop — the two commands: `make run` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
CONFIG ?= engine.toml

.PHONY: run test lint typecheck bench venv clean peers

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

run: $(STAMP)
	@mkdir -p var
	$(VENV)/bin/refloop db upgrade --config $(CONFIG)
	exec $(VENV)/bin/refloop run --config $(CONFIG)

# Third-party peers the tests run against, each in its own venv (their pins fight ours).
SEKMET = .peers/sekmet/bin/sekmet

$(SEKMET):
	$(PYTHON) -m venv .peers/sekmet
	.peers/sekmet/bin/pip install -q sekmet-fhir==0.1.1

peers: $(SEKMET)

test: $(STAMP) peers
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check engine channels tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
