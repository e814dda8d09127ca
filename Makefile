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
# the HTTP service (Sentry, OTLP, Prometheus) of the demo database: loopback only
RUN_HTTP     ?= 127.0.0.1:8787
PGRX_TEST_DIR?= /tmp/fraiseql_obs_pgrx_test
VENV         ?= $(CURDIR)/.venv
PSQL          = $(PG_BIN)/psql -X -v ON_ERROR_STOP=1 -h $(RUN_DIR) -p $(RUN_PORT) -U postgres

.PHONY: setup install install-release run stop test test-unit test-pgrx test-integration bench venv js clean

setup:
	@scripts/setup.sh

install: setup
	cargo pgrx install --pg-config $(PG_CONFIG) >/dev/null
	@echo "installed (debug build)"

install-release: setup
	cargo pgrx install --release --pg-config $(PG_CONFIG) >/dev/null
	@echo "installed (release build)"

run: install-release
	@scripts/pgcluster.sh start $(RUN_DIR) $(RUN_PORT) "fraiseql_obs.http_listen = '$(RUN_DB)@$(RUN_HTTP)'"
	@if ! $(PSQL) -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname = '$(RUN_DB)'" | grep -q 1; then \
		$(PSQL) -d postgres -qc "CREATE DATABASE $(RUN_DB)"; \
		$(PSQL) -d $(RUN_DB) -qc "CREATE EXTENSION fraiseql_obs"; \
		$(PSQL) -d $(RUN_DB) -q -f scripts/sample_data.sql >/dev/null; \
		echo "created database $(RUN_DB) with the extension and sample errors"; \
	else \
		$(PSQL) -d $(RUN_DB) -qc "ALTER EXTENSION fraiseql_obs UPDATE" 2>/dev/null || true; \
	fi
	@$(PSQL) -d $(RUN_DB) -qAtc "SELECT fraiseql_create_project('demo') WHERE NOT EXISTS (SELECT FROM tb_project WHERE name = 'demo')" >/dev/null 2>&1 || true
	@echo
	@echo "Connect:  $(PSQL) -d $(RUN_DB)"
	@echo "Workers:  SELECT pid, backend_type, state, query FROM pg_stat_activity WHERE backend_type LIKE 'fraiseql_obs%';"
	@echo "Stop:     make stop"
	@KEY=$$($(PSQL) -d $(RUN_DB) -qAtc "SELECT secret_key FROM v_projects WHERE name = 'demo' AND revoked_at IS NULL LIMIT 1" 2>/dev/null); \
	DSN=$$($(PSQL) -d $(RUN_DB) -qAtc "SELECT dsn FROM v_projects WHERE name = 'demo' AND revoked_at IS NULL LIMIT 1" 2>/dev/null); \
	if [ -n "$$DSN" ]; then \
		echo; \
		echo "Sentry SDKs:      SENTRY_DSN=$$DSN"; \
		echo "OpenTelemetry:    OTEL_EXPORTER_OTLP_ENDPOINT=http://$(RUN_HTTP) OTEL_EXPORTER_OTLP_HEADERS='Authorization=Bearer%20$$KEY'"; \
		echo "Prometheus:       curl -H 'Authorization: Bearer $$KEY' http://$(RUN_HTTP)/metrics"; \
	fi
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

# The grouping engine (corpus, property and hostile-input tests) and the HTTP
# ingest crate (server, encodings, Sentry formats): no PostgreSQL.
test-unit:
	cargo test -p fraiseql_fingerprint -p fraiseql_ingest

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

# The official JS clients the HTTP service is tested with (@sentry/node, the
# OpenTelemetry JS OTLP exporter), from the npm registry, as the lock file says.
js: tests/js/node_modules/.ok
tests/js/node_modules/.ok: tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# A real cluster with the worker preloaded, driven over real connections.
test-integration: install venv js
	$(VENV)/bin/pytest -q tests/integration

bench: install-release venv
	$(VENV)/bin/python bench/run.py

clean: stop
	rm -rf $(RUN_DIR) $(VENV) $(PGRX_TEST_DIR)
