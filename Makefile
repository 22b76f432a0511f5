PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: demo test venv bench-priors clean serve bench-serve load-serve mlflow-ui

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[ray,test,bench]'
	touch $(STAMP)

venv: $(STAMP)

# make demo [ARGS="section.key=value ... --progress lines"]: the console shows the stages, progress and results;
# Ray's and MLflow's output goes to <output_dir>/logs/job.log
demo: $(STAMP)
	$(PY) ray_jobs/refine.py --config configs/demo.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" --durations=25 tests

bench-priors: $(STAMP)
	$(PY) -m labelshift.bench.priors

SERVE_BUNDLE := outputs/demo/stages/export/bundles/adapted

# the HTTP server on 127.0.0.1:8000, serving make demo's adapted model with IA on its estimated prior
serve: $(STAMP)
	@test -f $(SERVE_BUNDLE)/bundle.json || { echo "make serve: no model bundle at $(SERVE_BUNDLE): run 'make demo' first (its export stage writes it)" >&2; exit 2; }
	$(VENV)/bin/serve run serve/config.yaml

MLFLOW_STORE ?= sqlite:///$(CURDIR)/mlflow.db
MLFLOW_PORT ?= 5000

# the MLflow UI on http://127.0.0.1:$(MLFLOW_PORT) over the project's store (what make demo and the jobs log to);
# artifacts are read where the runs keep them (<dir of the database>/mlartifacts)
mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_STORE) --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

bench-serve: $(STAMP)
	$(PY) -m labelshift.bench.serve

load-serve: $(STAMP)
	$(PY) -m labelshift.bench.serve --load

clean:
	rm -rf $(VENV) outputs mlflow.db
