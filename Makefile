# RPM pipeline — every entry point. `make help` lists them.
SHELL := /bin/bash
# Debian's own interpreter when there is one: the service account (RPM_RUN_AS) must be able to run .venv's
# Python, which a pyenv build under a private /root is not (README: Running as a service account).
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# State (secrets, broker, landing, warehouse, Airflow) in the repository's git-ignored var/ unless set.
export RPM_HOME ?= $(CURDIR)/var

.DEFAULT_GOAL := help
.PHONY: help system install demo test test-fast lint bench bench-deps up down status clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

system: ## apt-get Mosquitto (broker + clients), prometheus (promtool), python3-venv, chromium + chromium-driver (browser tests) when missing; as root, create the service account (RPM_RUN_AS)
	@if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ] || ! command -v mosquitto_pub >/dev/null 2>&1; then \
		echo "installing mosquitto with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; \
	fi
	@if ! command -v promtool >/dev/null 2>&1; then \
		echo "installing prometheus (its promtool checks deploy/prometheus/) with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	fi
	@if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
		echo "installing python3-venv with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	fi
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver with apt-get (the browser tests)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi
	@# The unprivileged account that owns the state and runs rpm when root starts it (RPM_RUN_AS; "root": none).
	@account="$${RPM_RUN_AS:-rpm}"; \
	if [ "$$(id -u)" = 0 ] && [ "$$account" != root ] && ! id -u "$$account" >/dev/null 2>&1; then \
		echo "creating the service account $$account"; \
		useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$$account"; \
	fi

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

install: system $(STAMP) ## create .venv and install the pinned dependencies (idempotent)

demo: install ## end to end on the embedded default: broker, ingest, simulated fleet, DAG run, reports
	$(BIN)/rpm demo

# Four workers on two cores (integration tests spend much of their time waiting on the broker, the service and
# Airflow); a module's tests stay on one worker, in order (modules share stacks). The 20 slowest are listed.
test: lint ## lint, then the whole test suite (unit, integration with a real broker, DAG end to end)
	$(BIN)/python -m pytest -n 4 --dist loadscope --durations=20

test-fast: install ## unit tests only (nothing started)
	$(BIN)/python -m pytest tests/unit

lint: install ## ruff (with Airflow AIR rules), the layer contracts (import-linter), mypy
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

bench-deps: install
	@if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
		echo "installing postgresql with apt-get (the peer design of bench/peer_postgres.py)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi
	@$(BIN)/python -c 'import psycopg' 2>/dev/null || $(BIN)/pip install -q -e '.[dev,bench]'

# The benchmarks' state lives in temporary folders of whoever runs them, not handed to the service account (as
# the commands in BENCHMARKS.md are run): as root, a bench's own ingest found the broker it had started as root
# and refused to start.
bench: export RPM_RUN_AS ?= root
bench: bench-deps ## every benchmark at its small default size (~30 min); BENCHMARKS.md has the large runs
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.alerts
	$(BIN)/python -m bench.queries
	$(BIN)/python -m bench.peer_postgres
	$(BIN)/python -m bench.freshness
	$(BIN)/python -m bench.steady --size 1000000 --runs 2

up: install ## the long-lived stack: broker, ingest, Airflow (UI on 127.0.0.1:8080, login printed), scheduled DAGs
	$(BIN)/rpm up --airflow

down: ## stop what `make up` started (Airflow, ingest, broker)
	@if [ -x $(BIN)/rpm ]; then $(BIN)/rpm down; fi

status: ## pids and ingest counters
	$(BIN)/rpm status

clean: down ## remove all generated state (secrets, landing data, warehouse) — irreversible
	rm -rf var
