# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test sweep demo lint typecheck bench proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(BIN)/python -m mypy
	$(BIN)/python -m mypy --platform win32 transports
	$(BIN)/python -m mypy --platform darwin transports
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

# Cancellation sweeps at every step (`make test` runs them sampled); -rP prints
# each target's summary: steps taken uncancelled, outcomes, handoff fallbacks.
sweep: $(STAMP)
	RPBROKER_SWEEP=full $(BIN)/python -m pytest -q -m sweep -rP

lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

typecheck: $(STAMP)
	$(BIN)/python -m mypy

demo: $(STAMP)
	$(BIN)/python examples/demo.py

bench: $(STAMP)
	$(BIN)/python -m bench

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
