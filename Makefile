# Two entry points a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-all lint clean

$(BIN)/xstilts: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[train,dev]"
	touch $@

install: $(BIN)/xstilts

# The demo world (task files, pretrained tiny models; cached under xstilts-demo/), the 66 runs
# of examples/demo.yaml (resumable), then the report under xstilts-out/demo/report/.
demo: install
	$(BIN)/python -m xstilts.demo
	$(BIN)/xstilts run examples/demo.yaml
	$(BIN)/xstilts report examples/demo.yaml

# Builds the test Kubernetes control plane from Go modules (cached outside the repo), then the
# default suite, then the slow tests (DeepSpeed under torchrun, the control-plane scenarios,
# the end-to-end demo), which CI runs too.
test: install
	bash scripts/build-control-plane.sh
	$(BIN)/ruff check .
	$(BIN)/python scripts/typecheck.py
	$(BIN)/pytest -q
	$(BIN)/pytest -q -m slow

lint: install
	$(BIN)/ruff check .
	$(BIN)/python scripts/typecheck.py

clean:
	rm -rf $(VENV) xstilts-out xstilts-demo .pytest_cache .mypy_cache .ruff_cache
