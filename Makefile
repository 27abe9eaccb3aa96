# make test: fresh machine -> .venv -> install -> whole test suite (what CI runs)
# make demo: fresh machine -> .venv -> install -> the main job, end to end on a tiny model
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

# Reinstalls only when pyproject.toml changed (the editable install picks up code changes by itself).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

test: install
	$(PY) -m pytest

demo: install
	$(PY) examples/demo.py

bench: install
	$(PY) benchmarks/bench_mixture.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
