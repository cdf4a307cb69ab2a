# `make demo` and `make test` work on a fresh machine: they create .venv and install the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS := test$(shell nvidia-smi >/dev/null 2>&1 && echo ,gpu)

.PHONY: venv demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) train_main.py --dataset=demo --depth=18 --data_dir=data/demo --model_dir=runs/demo \
		--export_dir=saved_models/demo --flagfile=configs/demo.cfg

test: venv
	$(PY) -m pytest tests

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs build *.egg-info
