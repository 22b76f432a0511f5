PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: demo test venv bench-priors clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[ray,test,bench]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) ray_jobs/refine.py --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" tests

bench-priors: $(STAMP)
	$(PY) -m labelshift.bench.priors

clean:
	rm -rf $(VENV) outputs mlflow.db
