# Every target does its own set-up (scripts/setup.sh is idempotent and fast once done).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup smoke test test-fast bench clean

setup:
	@bash scripts/setup.sh

# The main job on the embedded default: synthetic data, tiny model, local Ray, local storage.
smoke: setup
	$(VENV)/bin/yworld run jobs/smoke.yaml

# The whole test suite (what CI runs).
test: setup
	$(PY) -m pytest -q

# Everything but the slow end-to-end tests.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
