# Two commands (see README): `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cellbg-installed

.PHONY: demo test lint test-slow bench clean-venv

$(STAMP): pyproject.toml napari_plugin/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[napari,dev]" -e ./napari_plugin
	touch $(STAMP)

## Run the quickstart protocol end to end on synthetic data.
demo: $(STAMP)
	bash scripts/system-deps.sh
	$(BIN)/cellbg run protocols/quickstart.yaml

## Lint (ruff), format check and type check (mypy): the same checks as .pre-commit-config.yaml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Lint and type check, then the test suite (installs Xvfb etc. and starts a local Slurm cluster when root).
test: $(STAMP) lint
	bash scripts/system-deps.sh
	bash scripts/start-slurm.sh || echo "make test: no local Slurm cluster; the Slurm test will be skipped"
	if command -v xvfb-run >/dev/null; then xvfb-run -a -s "-screen 0 1280x1024x24" $(BIN)/python -m pytest -q; else $(BIN)/python -m pytest -q; fi

test-slow: $(STAMP)
	xvfb-run -a $(BIN)/python -m pytest -q -m slow

clean-venv:
	rm -rf $(VENV)
