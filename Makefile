# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs first:
# a Python venv from requirements*.txt and Azurite from package-lock.json (npm ci). Azurite and the Partner
# Center sandbox are started on 127.0.0.1 by the tests/demo themselves and stopped afterwards.

# Python 3.13: the version the app runs on in Azure (Flex Consumption) and the first one whose v1 worker
# (azure-functions-runtime-v1) is a PyPI package the app pins and the local runner and tests load.
PYTHON ?= $(shell for p in python3.13 $$HOME/.pyenv/versions/3.13*/bin/python3.13 /usr/local/bin/python3.13; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null \
	&& { command -v $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck demo bench soak clean

install: $(STAMP) node_modules/.installed

$(STAMP): requirements.txt requirements-local.txt requirements-dev.txt
	@if [ -z "$(PYTHON)" ]; then echo "error: Python 3.13 not found (on PATH as python3.13 or under ~/.pyenv/versions/3.13*)." \
		"Install it (for example 'pyenv install 3.13' or your distribution's python3.13 package) or run 'make PYTHON=/path/to/python3.13'." >&2; exit 1; fi
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 13) else "error: $(PYTHON) is not Python 3.13")'
	rm -rf $(VENV)
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
	$(PY) -m mypy d365_migration d365_tooling detect_expiring scan_customers purchase_new reassign_licenses suspend_old status

# Each test process starts its own Azurite and sandbox on loopback (tests/_azurite_plugin.py); the suite waits on
# them far more than it computes, so two processes on two cores (0: one process, no xdist).
TEST_PROCESSES ?= 2
test: install lint typecheck
	$(PY) -m pytest -q -m "not soak" -n $(TEST_PROCESSES)

demo: install
	$(PY) -m d365_migration demo

bench: install
	$(PY) -m d365_tooling.bench

soak: install
	$(PY) -m pytest -q -m soak tests/test_faults.py

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis
