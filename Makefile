# make test: fresh machine -> .venv -> install -> whole test suite (what CI runs)
# make demo: fresh machine -> .venv -> install -> assets -> object store -> workflow -> endpoint -> more adapters
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CLUSTER_DIR ?= .ray-cluster

.PHONY: install test demo bench cluster-up cluster-down clean

install: $(STAMP)

# Reinstalls only when pyproject.toml changed (the editable install picks up code changes by itself).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

test: install
	$(PY) -m pytest

# S3=1: the object store is a loopback S3 server the demo starts and stops
demo: install
	$(PY) examples/demo.py $(if $(S3),--s3)

bench: install
	$(PY) benchmarks/bench_mixture.py

# A local Ray head for `ray job submit` (free ports, token auth); cluster-down stops only its processes.
cluster-up: install
	$(PY) pipelines/local_cluster.py up --dir $(CLUSTER_DIR)

cluster-down:
	$(PY) pipelines/local_cluster.py down --dir $(CLUSTER_DIR)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
