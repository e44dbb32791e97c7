# driftloop: `make demo` runs the main job, `make test` runs the tests. Both set themselves up.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
# Every Airflow/MLflow-facing command runs with the same derived settings (SQLite by default,
# PostgreSQL databases on the DATABASE_URL server when it is set).
STACK  := eval "$$($(PY) -m scripts.stack_env)" && export PATH="$(CURDIR)/$(VENV)/bin:$$PATH"
PYTEST_ARGS ?=

.PHONY: help setup venv data airflow-db stores demo demo-train demo-fast demo-check review-shots serve test test-fast lint \
        dvc-repro airflow-ui mlflow-ui services-install services-start services-stop bench-serve bench-shadow \
        load-test fuzz-api clean

help: ## Show this help
	@echo "driftloop: an Airflow-orchestrated MLOps loop for a tweet sentiment classifier"
	@echo
	@echo "  make demo        run the whole loop end to end (sets everything up on first use)"
	@echo "  make test        run every test (installs PostgreSQL/Redis from Debian first if"
	@echo "                   missing; a missing server fails its tests, it never skips them)"
	@echo "  make test-fast   unit tests only: no servers, no apt-get"
	@echo
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sort | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || \
	  python3 -m pip install --quiet uv
	$(UV) sync --frozen
	@touch $@

venv: $(VENV)/.synced ## Create/refresh the Python environment from uv.lock

DATA_FILES := data/tweets.tsv data/val.tsv data/emotion/train.tsv data/emotion/val.tsv

$(DATA_FILES) &: $(VENV)/.synced $(addsuffix .dvc,$(DATA_FILES))
	$(VENV)/bin/dvc pull --quiet $(addsuffix .dvc,$(DATA_FILES))
	@touch $(DATA_FILES)

data: $(DATA_FILES) ## Fetch every task's data from the DVC remote (../shared/dvc-store)

airflow-db: $(VENV)/.synced ## Create/upgrade Airflow's metadata database
	@$(STACK) && airflow db migrate > "$${DRIFTLOOP_HOME}/airflow-db-migrate.log" 2>&1 || \
	  { tail -20 "$${DRIFTLOOP_HOME}/airflow-db-migrate.log"; exit 1; }

stores: $(VENV)/.synced ## Create/upgrade MLflow's backend and driftloop's tables (driftloop setup)
	@$(STACK) && driftloop setup > "$${DRIFTLOOP_HOME}/stores-setup.log" 2>&1 || \
	  { tail -20 "$${DRIFTLOOP_HOME}/stores-setup.log"; exit 1; }

setup: venv data airflow-db stores ## Everything demo needs: environment, data, every store migrated

demo: setup ## The whole loop: train, serve, drift, retrain, canary, damaged-model rollback
	@$(STACK) && $(PY) -m scripts.demo

demo-train: setup ## Only the first step: train_model with the default parameters
	@$(STACK) && $(PY) -m scripts.demo_train

demo-fast: setup ## The same loop with smaller samples (about 25 min on 2 CPU cores)
	@$(STACK) && $(PY) -m scripts.demo --fast

demo-check: venv ## Check the last demo's summary: each step's expected outcome, no failed task try
	@$(STACK) && $(PY) -m scripts.check_demo "$${DRIFTLOOP_HOME}/demo/summary.json"

review-shots: venv ## Screenshot the last demo's no-drift and drift review pages -> benchmarks/results/
	@$(STACK) && $(PY) -m scripts.review_shots

serve: setup ## Serve the champion on http://127.0.0.1:3000 (driftloop serve)
	@$(STACK) && driftloop serve --port 3000

# Tests build their own isolated state (tmp folders, fresh databases); only PATH is shared.
TESTENV := export PATH="$(CURDIR)/$(VENV)/bin:$$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  BENTOML_DO_NOT_TRACK=True

# `make test` installs the servers first; a test whose server binary is missing fails (naming
# `make services-install`) unless DRIFTLOOP_ALLOW_MISSING_SERVICES=1, which only test-fast sets.
test: services-install venv data ## Run every test (installs PostgreSQL/Redis first; real servers on loopback)
	@$(TESTENV) && $(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv data ## Unit tests only (no servers, no Airflow runs, no apt-get)
	@$(TESTENV) DRIFTLOOP_ALLOW_MISSING_SERVICES=1 && $(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

lint: venv ## ruff and mypy
	$(VENV)/bin/ruff check ml dags tests scripts benchmarks bentos monitoring
	$(VENV)/bin/ruff format --check ml dags
	$(VENV)/bin/mypy

dvc-repro: setup ## Reproduce prepare -> validate -> train -> evaluate from git + DVC alone
	@$(STACK) && dvc repro

airflow-ui: setup ## Airflow UI and scheduler on http://localhost:8080 (Ctrl-C stops)
	@$(STACK) && airflow standalone

mlflow-ui: venv ## MLflow UI on http://localhost:5000 over driftloop's tracking store
	@$(STACK) && mlflow ui --backend-store-uri "$$MLFLOW_TRACKING_URI" --port 5000

services-install: ## Install PostgreSQL and Redis from Debian's packages where missing (root or sudo)
	@bash scripts/services.sh install

services-start: services-install ## Start PostgreSQL and Redis on loopback (installs them if missing)
	bash scripts/services.sh start && bash scripts/services.sh env

services-stop: ## Stop the loopback PostgreSQL and Redis
	bash scripts/services.sh stop

bench-serve: setup ## Serving benchmark: naive baseline vs the service vs the model-only ceiling
	@$(STACK) && $(PY) -m benchmarks.serve_bench

bench-shadow: setup ## Shadow scoring benchmark: served p95 with shadow on vs off (~5 min)
	@$(STACK) && $(PY) -m benchmarks.shadow_bench

load-test: venv data ## Load and fault tests of the serving stack (~10 min) -> benchmarks/results/load_*
	@$(TESTENV) && $(PY) -m tests.harness.load --steady-seconds 300

fuzz-api: venv ## Fuzz a running service from its OpenAPI schema (URL=..., KEY=...; loopback only)
	@$(TESTENV) && $(PY) -m tests.harness.fuzz_api --url "$${URL:-http://127.0.0.1:3000}" \
	  $${KEY:+--key "$$KEY"} --out benchmarks/results/fuzz_api.md

clean: ## Remove driftloop's local state (.driftloop/): models, runs, Airflow metadata
	rm -rf .driftloop
