# Every target sets itself up: a fresh clone needs only python3 (3.11+) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The example rules, so a simulated fleet raises alerts and fills shopping lists at once.
ARGS   ?= --config docs/examples/gateway.toml

.PHONY: run test lint format bench fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p var
	$(BIN)/gateway serve $(ARGS)

# The DTLS extra compiles tinydtls (needs autoconf, automake, libtool: .ci/run installs them);
# without it the gateway still runs and the DTLS tests are skipped with that reason.
TEST_STAMP := $(VENV)/.installed-test

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,dtls]' \
		|| echo "note: DTLS extra not installed (needs autoconf automake libtool); DTLS tests skip"
	touch $(TEST_STAMP)

# Twice: on asyncio's own event loop, then on uvloop, the loop `gateway serve` runs on by
# default (libuv's UDP code is not asyncio's: tests/support/gateway.py, ON_UVLOOP).
test: $(TEST_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	TEST_EVENT_LOOP=uvloop $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gateway device_sim tests
	$(BIN)/ruff format --check gateway device_sim tests
	$(BIN)/mypy gateway device_sim

format: $(STAMP)
	$(BIN)/ruff check --fix gateway device_sim tests
	$(BIN)/ruff format gateway device_sim tests

# Figures against baselines measured in the same run (docs/performance.md); BENCH_QUICK=1
# for a smoke run of about 1.5 minutes; BENCH_ONLY=4,5 for only those figures.
bench: $(STAMP)
	$(BIN)/python bench/run.py

# Longer fuzz runs than the bounded ones in `make test` (FUZZ_EXAMPLES=N to change).
FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/fuzz -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
