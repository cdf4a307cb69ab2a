# `make demo` and `make test` work on a fresh machine: they create .venv and install the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS := test$(shell nvidia-smi >/dev/null 2>&1 && echo ,gpu)

.PHONY: venv demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

# Test processes (pytest-xdist; whole files per process, so module fixtures are built once). Each
# runs TensorFlow with its own threads and needs up to ~8 GiB: 2 fits a 2-core, 24 GiB machine.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

demo: venv
	$(PY) train_main.py --flagfile=configs/demo.flags

test: venv
	$(PYTEST) tests

# The fast tier for a development loop: everything but the end-to-end runs (under 3 minutes).
test-fast: venv
	$(PYTEST) -m "not slow" tests

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs build *.egg-info
