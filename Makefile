# The two commands of the README (`make demo`, `make test`) do all set-up themselves:
# a .venv with the package and its dev tools, and the pinned Claude Code CLI via `npm ci`.
# Both steps are skipped when their inputs have not changed since the last run.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PY_STAMP := $(VENV)/.stamp-install
NODE_STAMP := node_modules/.stamp-npm-ci

.PHONY: setup demo test lint typecheck bench clean chromium sandbox sandbox-packages

setup: $(PY_STAMP) $(NODE_STAMP)

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "claudecluster needs Python >= 3.11; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)

$(PY_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,ray]'
	@touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

demo: setup sandbox
	$(VENV)/bin/claudecluster demo

lint: $(PY_STAMP)
	$(PY) -m ruff check claudecluster_mcp tests bench
	$(PY) -m ruff format --check claudecluster_mcp tests bench

typecheck: $(PY_STAMP)
	$(PY) -m mypy

# System packages some tests need, installed with apt-get where we are root. Outside CI a
# package that cannot be installed only skips the tests that need it (pytest says why);
# with CI=true nothing may be skipped, so a missing package fails here, loudly.
# $(call system_packages,<Debian packages>,<shell test that they are there>,<who needs them>)
define system_packages
	@if ! { $(2); } >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's $(1) for $(3)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1)) >/dev/null 2>&1 || true; \
	  fi; \
	  if ! { $(2); } >/dev/null 2>&1; then \
	    case "$${CI:-}" in true|1|yes) \
	      echo "error: CI=true but $(1) is missing and could not be installed; $(3) may not be skipped in CI" >&2; \
	      exit 1;; \
	    esac; \
	    echo "note: no $(1) and cannot apt-get it; $(3) will be skipped"; \
	  fi; \
	fi
endef

# The HTML report test renders in Debian's headless Chromium.
chromium:
	$(call system_packages,chromium,command -v chromium || command -v chromium-browser,the HTML screenshot test)

# isolation = "sandbox" (the default) needs bubblewrap and socat on Linux.
sandbox:
	@[ "$$(uname -s)" != Linux ] || { $(MAKE) --no-print-directory sandbox-packages; }

sandbox-packages:
	$(call system_packages,bubblewrap socat,command -v bwrap && command -v socat,the sandbox tests)

test: setup lint typecheck chromium sandbox
	$(PY) -m pytest

bench: setup
	$(VENV)/bin/claudecluster bench

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
