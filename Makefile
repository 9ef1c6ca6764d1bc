# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The docs site (mkdocs.yml, docs/) into build/site; --strict fails on a link to a missing page or anchor.
# NO_MKDOCS_2_WARNING silences mkdocs-material's notice about MkDocs 2.0, not any warning about the pages.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

.PHONY: demo test lint docs bench install clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,deploy,dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python RUNME.py demo

test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(MKDOCS)
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

docs: install
	$(MKDOCS)

bench: install
	$(BIN)/python benchmarks/run.py --files 10000

clean:
	rm -rf build .warehouse sample_data dist
