# Everyday commands. `make run` and `make test` set up .venv/ themselves on first use.
# PYTHON makes .venv/: Python 3.11 or newer (another one: make run PYTHON=python3.12).
PYTHON ?= python3
# No "make[1]: Entering directory" lines (make -C, or make under make): `make run` prints only stepd's.
MAKEFLAGS += --no-print-directory
VENV := .venv
BIN := $(VENV)/bin

# Which Python an interpreter is (its version and installation), asked of PYTHON and of .venv/'s.
WHICH_PYTHON := import sys; print(sys.version.split()[0], sys.base_prefix)
PYTHON_ID := $(shell $(PYTHON) -c '$(WHICH_PYTHON)' 2>/dev/null)
VENV_ID := $(shell $(BIN)/python -c '$(WHICH_PYTHON)' 2>/dev/null)
PYTHON_OK := $(shell $(PYTHON) -c 'import sys; print(sys.version_info >= (3, 11))' 2>/dev/null)

# Checked before anything is installed (pip would fail deep down, on the first pin that needs 3.11),
# for every target but clean.
ifneq ($(filter-out clean,$(or $(MAKECMDGOALS),run)),)
ifneq ($(PYTHON_OK),True)
$(error stepd needs Python 3.11 or newer; $(PYTHON) is $(or $(firstword $(PYTHON_ID)),not found). \
Install one and run: make $(or $(MAKECMDGOALS),run) PYTHON=python3.11)
endif
# A .venv/ made by another Python (or whose Python is gone) is made again, not patched.
ifneq ($(VENV_ID),$(PYTHON_ID))
ifneq ($(wildcard $(VENV)),)
$(info stepd: .venv/ was made by another Python ($(or $(VENV_ID),one that no longer runs)); \
making it again with $(PYTHON) ($(PYTHON_ID)))
endif
.PHONY: $(VENV)/.created
endif
endif
# Redocly's OpenAPI linter, from npm (package-lock.json), for tests/test_api_openapi_lint.py. Without
# npm it is not installed, and that test is skipped (under CI it fails: there the lint must run).
NODE_TOOLS := $(if $(shell command -v npm 2>/dev/null),node_modules/.installed)

.PHONY: run runner test test-fast lint fix clean bench bench-peers

# `stepd serve` from .venv/ (stepd installed there, editable, with its pinned dependencies). Silent
# itself (@, and pip's output only when it fails), so with STEPD_LOG_FORMAT=json every line is JSON.
run: $(VENV)/.run-deps
	@$(BIN)/stepd serve

# One more runner process (delegates run there), beside a service started with STEPD_RUNNERS=0
# (a runner needs the same database file, so the same machine).
runner: $(VENV)/.run-deps
	@$(BIN)/stepd runner

# Two test processes (pytest-xdist), one a core: each takes the next test as it finishes one.
test: $(VENV)/.dev-deps $(NODE_TOOLS)
	$(BIN)/pytest -n 2

# The inner loop: every test that starts no service process (tests/conftest.py marks those slow).
test-fast: $(VENV)/.dev-deps
	$(BIN)/pytest -m "not slow" -n 2

# The benchmark (bench/run.py, a few minutes; not part of `make test`). It needs wrk.
# BENCH_FULL=1 adds worker memory over 200k restarts; BENCH_ARGS passes more options.
# Its PostgreSQL part (issue 20) runs where postgresql-15 is installed, and says why not elsewhere;
# BENCH_ARGS="--only postgres" runs that part alone (the two SQLite scripts after it are left out).
ONLY_POSTGRES := $(findstring --only postgres,$(BENCH_ARGS))
bench: $(VENV)/.run-deps
	@command -v wrk >/dev/null 2>&1 || { echo "make bench needs wrk, the HTTP load generator: sudo apt-get install wrk" >&2; exit 1; }
	$(BIN)/python bench/run.py $(if $(BENCH_FULL),--memory) $(BENCH_ARGS)
	$(if $(ONLY_POSTGRES),,$(BIN)/python bench/queue_latency.py)
	$(if $(ONLY_POSTGRES),,$(BIN)/python bench/metrics_cost.py)

# stepd beside huey and DBOS (bench/peers.py, issue 18's peers) and procrastinate (issue 20's, on a
# PostgreSQL 15 cluster the script starts and stops; its rows are skipped without postgresql-15).
# Optional, in no other target, in a venv of its own, .venv-peers/: stepd (editable) with the peers'
# pins of bench/requirements-peers.txt, which stay out of requirements*.txt. BENCH_ARGS passes more
# options (--quick: a smoke run; --engines procrastinate: its rows only).
PEERS_VENV := .venv-peers
bench-peers: $(PEERS_VENV)/.installed
	$(PEERS_VENV)/bin/python bench/peers.py $(BENCH_ARGS)

lint: $(VENV)/.dev-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fix: $(VENV)/.dev-deps
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# pip's output goes to .venv/pip.log and is shown only when it fails.
QUIETLY = >$(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log >&2; exit 1; }

$(VENV)/.created:
	@rm -rf $(VENV)
	@$(if $(filter json JSON,$(STEPD_LOG_FORMAT)),true,echo "stepd: setting up .venv/ (first use, a minute or two)" >&2)
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip $(QUIETLY)
	@touch $@

$(VENV)/.run-deps: requirements.txt pyproject.toml $(VENV)/.created
	@$(BIN)/pip install --quiet -r requirements.txt $(QUIETLY)
	@$(BIN)/pip install --quiet --no-deps --editable . $(QUIETLY)
	@touch $@

$(VENV)/.dev-deps: requirements.txt requirements-dev.txt pyproject.toml $(VENV)/.created
	@$(BIN)/pip install --quiet -r requirements-dev.txt $(QUIETLY)
	@$(BIN)/pip install --quiet --no-deps --editable . $(QUIETLY)
	@touch $@ $(VENV)/.run-deps

$(PEERS_VENV)/.installed: requirements.txt bench/requirements-peers.txt pyproject.toml
	@test -x $(PEERS_VENV)/bin/python || { echo "stepd: setting up $(PEERS_VENV)/ for make bench-peers" >&2; $(PYTHON) -m venv $(PEERS_VENV); }
	@$(PEERS_VENV)/bin/pip install --quiet -r requirements.txt -r bench/requirements-peers.txt >$(PEERS_VENV)/pip.log 2>&1 \
		|| { cat $(PEERS_VENV)/pip.log >&2; exit 1; }
	@$(PEERS_VENV)/bin/pip install --quiet --no-deps --editable . >$(PEERS_VENV)/pip.log 2>&1 \
		|| { cat $(PEERS_VENV)/pip.log >&2; exit 1; }
	@touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --ignore-scripts
	touch $@

clean:
	rm -rf $(VENV) $(PEERS_VENV) .pytest_cache node_modules
