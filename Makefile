# Quick-start commands: `make demo` (the dashboard, then the tiny model training on CPU while it serves),
# `make test` (the whole suite, CI's command) and `make test-fast` (every test that starts no training process).
# Each creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TINY   := configs/tiny.yaml
DASHBOARD_PORT ?= 5000

.PHONY: demo test test-fast durations venv tiny-model demo-data clean-demo

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-trackers.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulled in by another package would be the CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	# the kit itself, editable: scripts, tests and benchmarks import glmkit from this checkout
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

tiny-model: venv
	$(PY) download_model.py --config $(TINY) --tiny

demo-data: venv
	$(PY) -m glmkit.demo.corpus --config $(TINY)

# The dashboard first, then the same launcher and trainer as a real run, on the tiny model, while it serves;
# Ctrl-C stops both (the trainer saves a checkpoint: `make demo` again resumes it).
demo: tiny-model demo-data
	$(PY) -m glmkit.demo.live --config $(TINY) --port $(DASHBOARD_PORT)

test: venv
	$(PY) -m ruff check .
	# two workers, given whole test files, the longest first (tests/durations.json, see conftest.py): the
	# suite is mostly training subprocesses, and conftest.py builds shared artifacts once for both
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

# Everything that starts no training process (tests/conftest.py fails a test that trains without the `trains` mark).
test-fast: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 -m "not trains" --dist loadfile --no-loadscope-reorder tests

# The suite once more, writing each test's seconds to tests/durations.json: `make test` hands out the longest files first.
durations: venv
	GLMKIT_RECORD_DURATIONS=tests/durations.json $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

clean-demo:
	rm -rf models/tiny-glm4-moe data/demo.jsonl runs/tiny runs/tiny-best-adapter scratch
