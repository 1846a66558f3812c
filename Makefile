# Two entry points a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-all lint clean node-deps cluster-parts e2e gpu-bundle gpu-check

$(BIN)/xstilts: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[train,dev]"
	touch $@

install: $(BIN)/xstilts

# The demo world (task files, pretrained tiny models; cached under xstilts-demo/), the runs
# of examples/demo.yaml (resumable), then the report under xstilts-out/demo/report/.
demo: install
	$(BIN)/python -m xstilts.demo
	$(BIN)/xstilts run examples/demo.yaml
	$(BIN)/xstilts report examples/demo.yaml

# The lint, then builds the test Kubernetes control plane and node from Go modules and the images
# from the Dockerfile (all cached outside the repo), then the default suite, then the slow tests
# (DeepSpeed under torchrun, the control-plane scenarios, the end-to-end demo, the one-node
# cluster of tests/e2e), which CI runs too.
test: lint cluster-parts
	$(BIN)/pytest -q
	$(BIN)/pytest -q -m slow

# The wheels a bare GPU machine (Python 3.12, no network) lacks, into gpu-bundle/, size-checked
# against the 64 MiB that can be carried to it.
gpu-bundle: install
	PYTHON=$(BIN)/python bash scripts/build-gpu-bundle.sh

# On the GPU machine, with gpu-bundle/ carried along (no venv, no network): installs the bundle
# into gpu-check-out/site, runs the trainer's CUDA path and the benchmarks, and writes
# gpu-check-out/gpu-check.json and gpu-check.md (see README, "The GPU check").
gpu-check:
	bash benchmarks/gpu_check.sh

# ruff, then mypy over every module (scripts/typecheck.py; what it checks: [tool.mypy] files).
lint: install
	$(BIN)/ruff check .
	$(BIN)/python scripts/typecheck.py

clean:
	rm -rf $(VENV) xstilts-out xstilts-demo .pytest_cache .mypy_cache .ruff_cache

# Debian packages of the one-node cluster and the image builds (apt-get, only when missing).
node-deps:
	bash scripts/setup-node-deps.sh

# Everything the Kubernetes tests run, each step timed; every step reuses its cache.
cluster-parts: node-deps
	@t=$$(date +%s); bash scripts/build-control-plane.sh >/dev/null && echo "control plane: $$(( $$(date +%s) - t ))s"
	@t=$$(date +%s); bash scripts/build-node.sh >/dev/null && echo "node: $$(( $$(date +%s) - t ))s"
	@t=$$(date +%s); bash scripts/build-images.sh >/dev/null && echo "images: $$(( $$(date +%s) - t ))s"

# The end-to-end tests on a real one-node cluster (kubelet, containerd, the images built
# from the Dockerfile): builds or reuses the parts, runs tests/e2e, tears the cluster down.
e2e: install cluster-parts
	@t=$$(date +%s); $(BIN)/pytest -q -s -m slow tests/e2e; rc=$$?; echo "e2e tests: $$(( $$(date +%s) - t ))s"; exit $$rc
