# Every target does its own set-up (scripts/setup.sh is idempotent and fast once done).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup smoke self-train test test-fast bench clean

setup:
	@bash scripts/setup.sh

# The main job on the embedded default: synthetic data, tiny model, local Ray, local storage.
smoke: setup
	$(VENV)/bin/yworld run jobs/smoke.yaml

# The self-training loop: smoke (pretrain, evaluate, pseudo-label the captions split; a finished run is only
# re-evaluated), then train again with the pseudo labels added and evaluate.
self-train: smoke
	$(VENV)/bin/yworld run jobs/self_train_smoke.yaml

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
