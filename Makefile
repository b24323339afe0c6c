# Durable Execution the Hard Way: every command a reader or CI needs.
# `make test` works on a fresh machine with only Python >= 3.11 and make: it builds .venv first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LESSONS := $(sort $(wildcard lessons/[0-9][0-9]-*))
# The most advanced lesson: what `make run` shows.
LATEST_LESSON := $(lastword $(LESSONS))
SQLC_CONFIGS := $(sort $(wildcard lessons/*/sql/sqlc.yaml))
# The venv's bin goes first so sqlc finds the project's plugin (sqlc-gen-psycopg).
export PATH := $(CURDIR)/$(BIN):$(PATH)
# Silences mkdocs-material's end-of-life banner on every build.
export NO_MKDOCS_2_WARNING := 1

.PHONY: install test lint typecheck format generate check-generated run bench bench-peers docs docs-generate docs-serve db-stop db-reset clean

# Reinstall whenever pyproject.toml changes; the stamp file records the last install.
$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required; set PYTHON=python3.12 (or similar)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Two test processes (pytest-xdist) on a 2-core machine, at most four on bigger ones: the tests
# wait on PostgreSQL and on worker threads more than they compute.
test: install lint typecheck check-generated
	$(BIN)/python -m pytest -n auto --maxprocesses 4

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy, in each lesson directory on its own (every lesson has its own `db`, `engine`, `worker`
# modules, generated code included), then over the shared hardway package.
typecheck: install
	@for lesson in $(LESSONS); do (cd $$lesson && $(CURDIR)/$(BIN)/mypy .) || exit 1; done
	cd lessons && $(CURDIR)/$(BIN)/mypy -p hardway

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Regenerate every lesson's db/ package from its sql/ with sqlc and the psycopg plugin.
generate: install
	@for config in $(SQLC_CONFIGS); do echo "sqlc generate -f $$config"; $(BIN)/sqlc generate -f $$config || exit 1; done

# Fails when committed generated code differs from what sqlc generates now (a changed, missing
# or extra file in db/), or when sqlc rejects a query against its schema. Each lesson's sql/ is
# generated afresh in a scratch directory and compared with the committed db/.
check-generated: install
	@scratch=$$(mktemp -d); trap 'rm -rf "$$scratch"' EXIT; \
	for config in $(SQLC_CONFIGS); do \
		lesson=$$(dirname $$(dirname $$config)); rm -rf "$$scratch"/*; cp -r $$lesson/sql "$$scratch/sql"; \
		$(BIN)/sqlc generate -f "$$scratch/sql/sqlc.yaml" || { echo "sqlc rejected $$lesson/sql"; exit 1; }; \
		diff -r -x __pycache__ "$$scratch/db" $$lesson/db || { echo "generated code in $$lesson/db is stale: run 'make generate'"; exit 1; }; \
	done; echo "generated code is up to date ($(words $(SQLC_CONFIGS)) lessons)"

run: install
	$(BIN)/python $(LATEST_LESSON)/main.py

# Throughput and latency of the most advanced engine (its bench.py); not part of the test suite.
bench: install
	$(BIN)/python $(LATEST_LESSON)/bench.py

# The peers' own environment, apart from the project's; reinstalled when their pins change.
PEERS_VENV := .venv-peers
PEERS_REQUIREMENTS := lessons/08-listen-notify/peers/requirements.txt
$(PEERS_VENV)/.installed: $(PEERS_REQUIREMENTS)
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet -r $(PEERS_REQUIREMENTS)
	touch $@

# Lesson 08's engine beside pgqueuer and DBOS (its bench_peers.py); not part of the test suite.
bench-peers: install $(PEERS_VENV)/.installed
	cd lessons/08-listen-notify && $(CURDIR)/$(BIN)/python bench_peers.py

docs: install
	$(BIN)/mkdocs build --strict

# Rewrite the generated regions of the READMEs and docs pages (SQL diffs, code excerpts, output).
docs-generate: install
	$(BIN)/python -m hardway.docgen write

docs-serve: install
	$(BIN)/mkdocs serve --watch lessons

db-stop: install
	$(BIN)/python -m hardway.postgres stop

# Stop the embedded server and delete its data; the next run starts an empty one.
db-reset: db-stop
	rm -rf .pgdata

clean:
	rm -rf $(VENV) site .pytest_cache .ruff_cache .mypy_cache lessons/*/.mypy_cache
