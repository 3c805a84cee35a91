# Two commands for a newcomer: `make run` and `make test`. Both build .venv here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8080

.PHONY: run test venv venv-test postgres promtool chromium pgbouncer agents bench bench-peer bench-growth chaos check \
	clean fuzz auto-failover ha chaos-ha image image-test

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

# pg_auto_failover (pg_autoctl and the monitor's extension) for `make ha` and `make chaos-ha` (Debian's package).
auto-failover: postgres
	@bash deploy/ensure-auto-failover.sh >/dev/null

run: venv postgres
	$(BIN)/tokensforge demo --port $(PORT)

test: venv-test postgres promtool chromium pgbouncer agents
	$(BIN)/pytest --ignore=tests/test_image.py

# The gateway image (deploy/Dockerfile) with Docker or Podman, whichever works here (Debian's podman is
# installed when neither is); on python:3.11-slim when a registry answers, else on a Debian base made by
# debootstrap (deploy/ensure-base-image.sh, cached by its inputs). IMAGE=name:tag, BASE_IMAGE=...,
# CA_BUNDLE=file (trusted by the build's pip only; default: the host's bundle). README "Deploying".
image:
	@bash deploy/build-image.sh

# Builds the image, then two gateway containers from it run as deploy/docker-compose.yml runs them (PgBouncer,
# the direct URL, a migrate container, Prometheus with the alert rules) against the throwaway PostgreSQL and
# the simulated upstream: tests/test_image.py. A few minutes cold, under a minute once the base is cached.
image-test: venv-test postgres pgbouncer promtool
	$(BIN)/pytest -s tests/test_image.py

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
# Then the failover soak: pg_auto_failover promotes the standby under load (tests/ha_soak.py, ~2 min).
chaos: venv-test postgres auto-failover
	$(BIN)/python -m tests.chaos $(CHAOS_ARGS)
	$(BIN)/python -m tests.ha_soak $(HA_ARGS)

# High availability to watch (README "High availability"): a pg_auto_failover monitor, primary and synchronous
# standby on loopback, and the demo gateway on $(PORT) following them; it prints how to fail over.
ha: venv auto-failover
	bash deploy/ha/run.sh $(PORT)

# The failover soak alone (~2 min): pg_auto_failover promotes the standby under load, twice (tests/ha_soak.py).
chaos-ha: venv-test auto-failover
	$(BIN)/python -m tests.ha_soak $(HA_ARGS)

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
