# opsloop — every target installs what it needs first. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
# Use the uv on PATH; otherwise the one `make uv` installs into the user site (run as a module).
UV ?= $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
RUN := $(UV) run --no-sync
export DVC_NO_ANALYTICS := 1
export MPLBACKEND := Agg
export NO_MKDOCS_2_WARNING := 1

.PHONY: help uv install run repro data test test-fast lint format typecheck docs docs-serve clean
.PHONY: mlflow-ui

help: ## List the targets.
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

uv: ## Install uv with pip when it is missing.
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv \
		|| $(PYTHON) -m pip install --quiet --user uv \
		|| $(PYTHON) -m pip install --quiet --user --break-system-packages uv

install: uv ## Create .venv from uv.lock exactly (all extras, dev and docs tools).
	$(UV) sync --locked --all-extras --compile-bytecode

run: install ## Install, then run the whole loop on embedded defaults: data to a served bundle.
	$(RUN) opsloop pipeline

repro: install ## Rebuild the DVC pipeline's stages that changed (dvc repro).
	$(RUN) dvc repro

data: install ## Prepare the default dataset (pass overrides with ARGS="data=mnist").
	$(RUN) opsloop data $(ARGS)

mlflow-ui: install ## Browse tracked runs: the MLflow UI over ./mlflow.db on http://127.0.0.1:5000.
	$(RUN) mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port 5000

lint: install ## Ruff lint and format check.
	$(RUN) ruff check .
	$(RUN) ruff format --check .

format: install ## Apply ruff's fixes and formatting.
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

typecheck: install ## mypy --strict on src/.
	$(RUN) mypy

test-fast: install ## Only the fast tests (skips those marked slow).
	$(RUN) pytest -m "not slow" -q

docs: install ## Build the documentation site strictly into site/.
	$(RUN) mkdocs build --strict --quiet

docs-serve: install ## Serve the documentation with live reload.
	$(RUN) mkdocs serve

test: install lint typecheck docs ## Install, then run every check: lint, types, docs, all tests with coverage.
	$(RUN) pytest --cov --cov-report=term-missing

clean: ## Remove caches and build output (keeps data and the venv).
	rm -rf .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov site dist
