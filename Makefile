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

demo: venv
	$(PY) train_main.py --flagfile=configs/demo.flags

test: venv
	$(PY) -m pytest tests

# The fast tier for a development loop: everything but the end-to-end runs (under 3 minutes).
test-fast: venv
	$(PY) -m pytest -m "not slow" tests

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs build *.egg-info
