# fraiseql_obs — see README.md
#   make run    set everything up, start a local PostgreSQL 15 with the worker, load sample data
#   make test   set everything up, run every test
#   make bench  benchmarks (results in BENCHMARKS.md)
#   make stop   stop the local cluster

SHELL        := /bin/bash
PG_CONFIG    ?= /usr/lib/postgresql/15/bin/pg_config
PG_BIN       ?= /usr/lib/postgresql/15/bin
RUN_DIR      ?= $(CURDIR)/.pgdata
RUN_PORT     ?= 54329
RUN_DB       ?= fraiseql_demo
PGRX_TEST_DIR?= /tmp/fraiseql_obs_pgrx_test
VENV         ?= $(CURDIR)/.venv
PSQL          = $(PG_BIN)/psql -X -v ON_ERROR_STOP=1 -h $(RUN_DIR) -p $(RUN_PORT) -U postgres

.PHONY: setup install install-release run stop test test-unit test-pgrx test-integration bench venv clean

setup:
	@scripts/setup.sh

install: setup
	cargo pgrx install --pg-config $(PG_CONFIG) >/dev/null
	@echo "installed (debug build)"

install-release: setup
	cargo pgrx install --release --pg-config $(PG_CONFIG) >/dev/null
	@echo "installed (release build)"

run: install-release
	@scripts/pgcluster.sh start $(RUN_DIR) $(RUN_PORT)
	@if ! $(PSQL) -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname = '$(RUN_DB)'" | grep -q 1; then \
		$(PSQL) -d postgres -qc "CREATE DATABASE $(RUN_DB)"; \
		$(PSQL) -d $(RUN_DB) -qc "CREATE EXTENSION fraiseql_obs"; \
		$(PSQL) -d $(RUN_DB) -q -f scripts/sample_data.sql >/dev/null; \
		echo "created database $(RUN_DB) with the extension and sample errors"; \
	else \
		$(PSQL) -d $(RUN_DB) -qc "ALTER EXTENSION fraiseql_obs UPDATE" 2>/dev/null || true; \
	fi
	@echo
	@echo "Connect:  $(PSQL) -d $(RUN_DB)"
	@echo "Workers:  SELECT pid, backend_type, state, query FROM pg_stat_activity WHERE backend_type LIKE 'fraiseql_obs%';"
	@echo "Stop:     make stop"
	@echo
	@echo "Top errors:"
	@$(PSQL) -d $(RUN_DB) -c "SELECT error_type, left(title, 60) AS title, culprit, occurrence_count, status FROM v_error_groups ORDER BY occurrence_count DESC LIMIT 10"

stop:
	@scripts/pgcluster.sh stop $(RUN_DIR)

venv: $(VENV)/.ok
$(VENV)/.ok: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r tests/requirements.txt
	touch $@

test: setup test-unit test-pgrx test-integration

# The grouping engine: corpus, property and hostile-input tests (no PostgreSQL).
test-unit:
	cargo test -p fraiseql_fingerprint

# Rust unit tests and in-database tests (each in a rolled-back transaction).
# One at a time: they share a database, and partition DDL in concurrent
# transactions would wait on (or deadlock with) each other.
test-pgrx: export RUST_TEST_THREADS = 1
test-pgrx: setup
	mkdir -p $(PGRX_TEST_DIR) && if [ "$$(id -u)" = 0 ]; then chown postgres: $(PGRX_TEST_DIR); fi
	if [ "$$(id -u)" = 0 ]; then \
		cargo pgrx test pg15 --runas postgres --pgdata $(PGRX_TEST_DIR)/data; \
	else \
		cargo pgrx test pg15; \
	fi

# A real cluster with the worker preloaded, driven over real connections.
test-integration: install venv
	$(VENV)/bin/pytest -q tests/integration

bench: install-release venv
	$(VENV)/bin/python bench/run.py

clean: stop
	rm -rf $(RUN_DIR) $(VENV) $(PGRX_TEST_DIR)
