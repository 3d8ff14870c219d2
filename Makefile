# `make test` and `make demo` create (or reuse) .venv and install vitkit into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: test test-all demo venv venv-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# stamp files: reinstall only when pyproject.toml changes
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

test: venv-dev
	$(PY) -m pytest -q

# full-size parity for every variant (slow: large, huge and giant models at full depth)
test-all: venv-dev
	$(PY) -m pytest -q --run-slow

demo: venv
	$(PY) -m vitkit models 'deit*'
	$(PY) scripts/demo_predict.py

clean:
	rm -rf $(VENV) .pytest_cache
