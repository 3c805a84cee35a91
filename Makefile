# Two commands for a newcomer: `make run` and `make test`. Both build .venv here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8080

.PHONY: run test venv venv-test postgres promtool chromium pgbouncer agents bench bench-peer bench-growth chaos check clean fuzz

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-run

venv: $(VENV)/.installed-run
venv-test: $(VENV)/.installed-test

# PostgreSQL server binaries (initdb, pg_ctl): found, or installed from Debian's packages.
postgres:
	@bash deploy/ensure-postgres.sh >/dev/null

# promtool checks the alert rules in deploy/ (Debian's prometheus package ships it).
promtool:
	@bash deploy/ensure-promtool.sh >/dev/null

# Chromium drives the playground's browser tests (Debian's package).
chromium:
	@bash deploy/ensure-chromium.sh >/dev/null

# PgBouncer (transaction mode) in front of the test database: tests/test_pgbouncer.py (Debian's package).
pgbouncer:
	@bash deploy/ensure-pgbouncer.sh >/dev/null

# Claude Code and OpenAI's Codex CLI at pinned versions, from npm into .agents/ (tests/test_agents_e2e.py).
agents:
	@bash deploy/ensure-agents.sh >/dev/null

run: venv postgres
	$(BIN)/tokensforge demo --port $(PORT)

test: venv-test postgres promtool chromium pgbouncer agents
	$(BIN)/pytest

bench: venv-test postgres
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

bench-peer: venv-test postgres
	$(BIN)/python -m benchmarks.run --peer $(BENCH_ARGS)

# Data growth: views, export and settlements on an empty database and after N records
# (GROWTH_ARGS="--quick" for a CI-sized run, "--records 1500000" medium; the default is 10 M records)
bench-growth: venv-test postgres
	$(BIN)/python -m benchmarks.growth_bench $(GROWTH_ARGS)

# Chaos soak (a few minutes): two gateways, a flaky upstream, a gateway SIGKILL and a database crash per
# 45 s, then exact reconciliation; fails on drift or any broken check. CHAOS_ARGS="--duration 60" shortens it.
chaos: venv-test postgres
	$(BIN)/python -m tests.chaos $(CHAOS_ARGS)

# Long schemathesis run against GET /openapi.json's contract (tests/test_fuzz.py; `make test` runs a short one).
# A new seed each time unless FUZZ_SEED is given; a failure prints it and the smallest failing curl.
FUZZ_EXAMPLES ?= 300
FUZZ_SEED ?= $(shell date +%s)
fuzz: venv-test postgres
	@echo "fuzz: $(FUZZ_EXAMPLES) examples per operation and mode, seed $(FUZZ_SEED)"
	TOKENSFORGE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) TOKENSFORGE_FUZZ_SEED=$(FUZZ_SEED) $(BIN)/pytest tests/test_fuzz.py -s

# Pinned: a new ruff or mypy release must not turn CI red on unchanged code; bump them on purpose.
check: venv-test
	$(BIN)/pip install -q ruff==0.17.6 mypy==2.4.1
	$(BIN)/ruff check tokensforge tests
	$(BIN)/mypy tokensforge

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
