# The two commands the README opens with: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: serve test test-marked lint bench docs docs-serve

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,docs]'
	touch $@

# Build the example environment offline (cached), then serve it through the entrypoint on :8080.
# MLSERVER_ENV_INIT=always: the entrypoint stays as the tiny init it is in a container, so a Ctrl-C
# while mlserver 1.1.0 is still loading (where it can hang for good) ends the server in 8 s.
serve: $(VENV)/.installed
	scripts/install-system-deps
	$(PY) examples/build_env.py --out examples/seed
	MLSERVER_ENV_TARBALL=$(CURDIR)/examples/seed/old-sklearn.tar.gz MLSERVER_MODELS_DIR=$(CURDIR)/examples/seed \
		MLSERVER_ENV_INIT=always $(VENV)/bin/mlserver-entrypoint

# The default suite (well under 15 minutes).
test: $(VENV)/.installed
	scripts/install-system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# The heavy suites CI also runs: fault injection at scale and real container runs.
test-marked: $(VENV)/.installed
	scripts/install-system-deps container
	$(PY) -m pytest -m "slow or container" $(PYTEST_ARGS)

# The unpack benchmark (docs/performance.md): about 20 minutes on 2 cores; BENCH_ARGS=--quick skips the
# 2 GB synthetic environment. Writes benchmarks/results/unpack.{md,png,json}.
BENCH_ARGS ?=
bench: $(VENV)/.installed
	scripts/install-system-deps bench
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) benchmarks/unpack.py $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check entrypoint tests examples benchmarks docs
	$(VENV)/bin/ruff format --check entrypoint tests examples benchmarks docs
	$(VENV)/bin/mypy

# The documentation site (docs/, mkdocs.yml) into build/site, with strict checks; docs-serve serves it on :8000.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d build/site

docs-serve: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve
