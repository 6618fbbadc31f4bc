# The two commands of README.md. Both create .venv on first use and are fast after.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: up test browser bench soak chaos runs-crash node-stop-race fuzz lint clean

up: $(VENV)/.installed
	-$(BIN)/nexus ui assets >/dev/null  # the dashboard's htmx, from the npm registry (once)
	$(BIN)/nexus up

test: $(VENV)/.installed-dev browser
	$(BIN)/nexus runtime prepare
	$(BIN)/nexus ui assets >/dev/null
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/eventstore.py

# 1,000 concurrent sessions for 10 minutes: memory flat, p95 stable (docs/reliability.md);
# e.g. `make soak SOAK_ARGS="--sessions 250"` on a small or busy machine
soak: $(VENV)/.installed-dev
	$(BIN)/python bench/soak.py --gate $(SOAK_ARGS)

# kill -9 each process kind in turn under load, many rounds, invariants after each
# (docs/reliability.md, "Chaos"); e.g. `make chaos CHAOS_ARGS="--rounds 120 --seed 1"`
chaos: $(VENV)/.installed-dev
	$(BIN)/python -m tests.chaos $(CHAOS_ARGS)

# agent runs: the owner killed with SIGKILL under 20 runs (make test runs 8)
runs-crash: $(VENV)/.installed-dev
	NEXUS_TEST_CRASH_RUNS=20 $(BIN)/python -m pytest -p no:cacheprovider -q tests/test_runs.py -k many_runs

# a node whose re-registration is answered as it stops still stops on SIGTERM, many
# rounds (the race is timing-dependent; tests/node_stop_race.py)
node-stop-race: $(VENV)/.installed-dev
	$(BIN)/python -m tests.node_stop_race --when draining $(RACE_ARGS)
	$(BIN)/python -m tests.node_stop_race --when sigterm --jitter-s 0.03 $(RACE_ARGS)

# Schemathesis over every operation, admin and tenant key, all checks and phases
# (docs/reliability.md, "Fuzz"); e.g. `make fuzz FUZZ_EXAMPLES=200`
FUZZ_EXAMPLES ?= 50
fuzz: $(VENV)/.installed-dev
	NEXUS_FUZZ_FULL=1 NEXUS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest tests/test_fuzz.py -s -o timeout=3600 $(PYTEST_ARGS)

# the dashboard's browser tests drive Debian's chromium (tests/test_dashboard.py)
browser:
	@command -v chromium >/dev/null 2>&1 || { echo 'installing chromium (apt-get)'; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium || { $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }; }

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
