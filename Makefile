# `make test` and `make demo` create (or reuse) .venv and install vitkit into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: test test-all lint demo venv venv-dev browser kernels clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Byte-code: every Python process of the tests, the demo and the tools below reads compiled modules from one
# cache inside the venv (PYTHONPYCACHEPREFIX: the source tree stays clean, `make clean` removes it; apt's own
# Python keeps its usual folders) and writes what it compiles there, even where the shell sets
# PYTHONDONTWRITEBYTECODE. Without it each of the suite's processes compiled torch, torch._dynamo (pulled in by
# torchvision's import) and the rest from source: `import torchvision` 16.5-17.2 s against 6.1-7.1 s, the
# suite 615 / 632 s against 470 / 554 s on a 2-core Zen 1 EPYC (docs/PERFORMANCE.md item 28)
export PYTHONPYCACHEPREFIX := $(CURDIR)/$(VENV)/pycache
unexport PYTHONDONTWRITEBYTECODE

# stamp files: reinstall only when pyproject.toml changes. --no-compile: pip would byte-compile every module
# of every package (torch, transformers, mlflow, ...); the processes above compile the ones they import, once,
# into the cache (the dev install took 2 min 56 s against 4 min 34 s on a 2-core Zen 1 EPYC, item 21)
PIP_INSTALL := $(PIP) install -q --no-compile
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP_INSTALL) -e '.[dev]'
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

# vitkit's C++ kernels (Swin's window attention) for this CPU, into ~/.cache/vitkit/kernels: ~15 s once per
# machine, source and torch version, then a no-op. Without a compiler the models take their torch path.
kernels: venv
	@$(PY) -m vitkit.layers.kernels || echo "vitkit kernels not built: the models take their torch path"

# ruff (lint and format), mypy, and the import-linter contracts (layers, no cycles) of pyproject.toml
LINT_PATHS := src tests scripts hubconf.py
lint: venv-dev
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# two pytest-xdist workers, one per core of the project's 2-core machine, each test file on one worker (its
# module fixtures built once); tests/conftest.py shares the cores' torch threads out between them. Half the
# suite's wall time is single-threaded (imports, process starts), so two workers took 7 min 41 s where one
# took 13 min 34 s (docs/PERFORMANCE.md item 24). --durations=15: the 15 slowest tests.
test: lint browser kernels
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# the `vitkit serve` page test drives Debian's chromium (no browser download is possible) on a Fashion-MNIST
# test image: as root, install both once; elsewhere that test skips and says why
BROWSER_PACKAGES := chromium dataset-fashion-mnist
browser:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { [ ! -x /usr/bin/chromium ] || [ ! -d /usr/share/datasets/fashion-mnist ]; }; then \
	  echo "installing $(BROWSER_PACKAGES) (Debian) for the page test ..."; \
	  export DEBIAN_FRONTEND=noninteractive; unset PYTHONPYCACHEPREFIX; \
	  apt-get install -y -q $(BROWSER_PACKAGES) >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q $(BROWSER_PACKAGES) >/dev/null; } || \
	    echo "could not install $(BROWSER_PACKAGES): the page test will skip"; \
	fi

# full-size parity for every variant (slow: large, huge and giant models at full depth); one process, since
# two workers would each hold a giant model and its timm twin at once
test-all: lint kernels
	$(PY) -m pytest -q --run-slow --durations=15

# Fashion-MNIST end to end: data (the Debian package when root), training of the fmnist_demo recipe
# (a ViT, about 6 minutes on 2 CPU cores), test evaluation, predictions for a few test images
DEMO_RUN ?= runs/fmnist_demo
# idle OpenMP threads sleep instead of spinning: on a busy 2-core machine, spinning slows training several-fold
demo: export OMP_WAIT_POLICY ?= PASSIVE
demo: venv kernels
	$(PY) scripts/demo.py data
	rm -rf $(DEMO_RUN)
	$(PY) -m vitkit train --recipe fmnist_demo --output $(DEMO_RUN)
	$(PY) -m vitkit eval --run $(DEMO_RUN) --split test --out $(DEMO_RUN)/test.json --confusion $(DEMO_RUN)/confusion.png
	$(PY) scripts/demo.py samples $(DEMO_RUN)/samples 5
	$(PY) -m vitkit predict $(DEMO_RUN)/samples/*.png --run $(DEMO_RUN) --top-k 3
	$(PY) scripts/demo.py summary $(DEMO_RUN)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
