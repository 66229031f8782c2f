# Two entry points: `make serve` and `make test`. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The GPU extra (onnxruntime-gpu + TensorRT 10) only where nvidia-smi sees a GPU.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
RUNTIME_EXTRA := $(if $(HAS_GPU),gpu,cpu)
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.serve-$(RUNTIME_EXTRA): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[$(RUNTIME_EXTRA)]"
	touch $@

$(VENV)/.test-$(RUNTIME_EXTRA): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[$(RUNTIME_EXTRA),train,dev]"
	touch $@

serve: $(VENV)/.serve-$(RUNTIME_EXTRA)
	$(BIN)/aoi serve $(SERVE_ARGS)

lint: $(VENV)/.test-$(RUNTIME_EXTRA)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/vulture service models train export aoi benchmarks tests/vulture_whitelist.py --min-confidence 80

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

format: $(VENV)/.test-$(RUNTIME_EXTRA)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
