# Every target creates .venv and installs what it needs: on a fresh machine
# `make demo` and `make test` are all the set-up there is.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-pythons lint docs docs-serve bench clean system-deps consul

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# `make demo DEMO_ARGS="--duration 10"` for a shorter run.
demo: $(VENV)/.demo
	$(BIN)/python -m examples.run_demo $(DEMO_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict rr_middleware
	$(BIN)/python .ci/check-structure

# The documentation site (MkDocs Material) into site/, which is ignored. --strict: a broken
# link, an option missing from the configuration reference or a docstring the API
# reference cannot read fails the build. Material prints an end-of-life notice on every
# build; NO_MKDOCS_2_WARNING silences that notice only. `python -m` puts this directory
# first on sys.path, so the hook reads the defaults of the code here.
docs: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --quiet

# The site at http://127.0.0.1:8000, rebuilt on every change.
docs-serve: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs serve

# System packages the tests drive for real: headless Chromium for the status page.
# Installed with apt-get (root on CI) unless already there.
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the status-page tests"; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }

# A Consul agent for the service-discovery tests: Debian's consul package unpacked into
# .venv without touching the system (see the script). CONSUL_BIN=path uses another binary.
consul: | $(BIN)/python
	@.ci/install-consul $(VENV)

# pytest exits 5 when it collects no test; make fails on any non-zero exit.
# Then the same suite on every other Python of PYTHONS found on the machine (see
# .ci/test-pythons; side by side, the tests marked slow left out): `make test PYTHONS=` runs .venv's alone.
PYTHONS ?= 3.10 3.11 3.12 3.13

test: $(VENV)/.dev system-deps consul lint docs
	$(BIN)/python -m pytest
ifneq ($(strip $(PYTHONS)),)
	.ci/test-pythons $(PYTHONS)
endif

test-pythons: $(VENV)/.dev system-deps consul
	.ci/test-pythons $(PYTHONS)

# Every performance target in one table (~9 min), also written into docs/performance.md
# (between its generated markers); BENCH_ARGS="--quick" for a smoke run, "--only
# throughput,post" for a subset, which leaves the page alone (see benchmarks/README.md).
# nginx is the reference proxy; Debian's nginx-light is enough.
bench: $(VENV)/.dev
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	@command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq nginx-light)
	$(BIN)/python benchmarks/run_all.py --write-page docs/performance.md $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-3.* .pytest_cache .mypy_cache .ruff_cache .hypothesis site
