# The two commands of the README (`make demo`, `make test`) do all set-up themselves:
# a .venv with the package and its dev tools, and the pinned Claude Code CLI via `npm ci`.
# Both steps are skipped when their inputs have not changed since the last run.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PY_STAMP := $(VENV)/.stamp-install
NODE_STAMP := node_modules/.stamp-npm-ci

.PHONY: setup demo test lint typecheck bench clean chromium

setup: $(PY_STAMP) $(NODE_STAMP)

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "claudecluster needs Python >= 3.11; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)

$(PY_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

demo: setup
	$(VENV)/bin/claudecluster demo

lint: $(PY_STAMP)
	$(PY) -m ruff check claudecluster_mcp tests bench
	$(PY) -m ruff format --check claudecluster_mcp tests bench

typecheck: $(PY_STAMP)
	$(PY) -m mypy

# The HTML report test renders in Debian's headless Chromium; install it where we can.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "installing Debian's chromium for the report test"; \
	      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; \
	    else echo "note: no chromium and cannot apt-get it; the HTML screenshot test will be skipped"; fi; }

test: setup lint typecheck chromium
	$(PY) -m pytest

bench: setup
	$(VENV)/bin/claudecluster bench

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
