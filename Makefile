# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs first:
# a Python venv from requirements*.txt and Azurite from package-lock.json (npm ci). Azurite and the Partner
# Center sandbox are started on 127.0.0.1 by the tests/demo themselves and stopped afterwards.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck demo bench soak clean

install: $(STAMP) node_modules/.installed

$(STAMP): requirements.txt requirements-local.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch node_modules/.installed

lint: $(STAMP)
	$(PY) -m ruff check .

typecheck: $(STAMP)
	$(PY) -m mypy d365_migration detect_expiring scan_customers purchase_new reassign_licenses suspend_old status

test: install lint typecheck
	$(PY) -m pytest -q -m "not soak"

demo: install
	$(PY) -m d365_migration demo

bench: install
	$(PY) -m d365_migration.bench

soak: install
	$(PY) -m pytest -q -m soak tests/test_faults.py

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis
