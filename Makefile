# make run: set up .venv and run the embedded pipeline with the live board.
# make test: set up .venv and run every test (unit, integration on real engines, end to end).
# make unit: the pure tests alone, in under a minute.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test unit faults fuzz tools lint fmt typecheck check bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,mlflow]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/gpuledger up

# System tools the tests run for real (they fail, never skip, without them).
TOOLS := gcc shellcheck systemd-analyze prometheus-alertmanager
tools:
	@missing=""; for t in $(TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && apt-get install -y -qq gcc shellcheck systemd prometheus-alertmanager >/dev/null; \
	fi

# The FinOps Foundation's FOCUS validator pins versions that clash with ours: its own venv.
FOCUS_VENV := .venv-focus
$(FOCUS_VENV)/.installed:
	$(PY) -m venv $(FOCUS_VENV)
	$(FOCUS_VENV)/bin/pip install -q 'focus-validator==1.0.0' 'multimethod==1.10' 'pyarrow==19.0.1'
	touch $@

# Most tests wait on a broker, a store or a worker process, not the CPU: three processes, each
# taking whole test files (their module fixtures stay shared), run them in half the time.
TEST_PROCESSES ?= 3
test: $(STAMP) tools $(FOCUS_VENV)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_PROCESSES) --dist loadfile $(PYTEST_ARGS)

# The pure tests alone (no broker, store or child process; under a minute): the cost model,
# the ledger's decisions, parsing, the layers. Tests that start a peer are marked integration or e2e.
UNIT_TESTS := tests/unit tests/alerts/test_budgets.py tests/alerts/test_idle_episodes.py \
  tests/analysts/test_window.py
unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not integration and not e2e" $(UNIT_TESTS) $(PYTEST_ARGS)

# The fault tests alone (kill -9, outages, malformed floods); `make test` runs them too.
faults: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/faults $(PYTEST_ARGS)

# The differential tests with a larger budget: FUZZ_FLEETS generated fleets in process and
# FUZZ_WORKER_FLEETS through a real worker (`make test` runs 3,000 plus 500 larger ones, and 4 plus a killed run).
FUZZ_FLEETS ?= 20000
FUZZ_WORKER_FLEETS ?= 20
fuzz: $(STAMP)
	GPULEDGER_DIFF_EXAMPLES=$(FUZZ_FLEETS) GPULEDGER_DIFF_WORKER_EXAMPLES=$(FUZZ_WORKER_FLEETS) \
	  $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/differential $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
