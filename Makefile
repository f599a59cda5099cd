# cifar-serve developer commands. `make serve` and `make test` are all a fresh clone needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
MODEL_DIR ?= artifacts
CHECKPOINT ?= models/resnet18_cifar10.pt
STAMP := $(VENV)/.installed

.PHONY: help install artifacts serve test lint typecheck gen check-gen bench clean

help:
	@echo "make serve   - install into $(VENV), export the shipped model into $(MODEL_DIR)/, start the server on :50051"
	@echo "make test    - install into $(VENV) and run the whole test suite"
	@echo "make gen     - regenerate the gRPC stubs from proto/"
	@echo "make lint    - ruff and mypy"
	@echo "make bench   - run the benchmark and update BENCHMARKS.md"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(MODEL_DIR)/manifest.json: $(STAMP) $(CHECKPOINT)
	$(BIN)/cifar-export --checkpoint $(CHECKPOINT) --out $(MODEL_DIR) --force --quiet

artifacts: $(MODEL_DIR)/manifest.json

serve: artifacts
	$(BIN)/cifar-serve --model-dir $(MODEL_DIR)

test: artifacts
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check export server client tests benchmarks
	$(BIN)/ruff format --check export server client tests benchmarks || true
	$(PY) tools/typecheck.py

gen: $(STAMP)
	$(PY) tools/gen_protos.py

check-gen: $(STAMP)
	$(PY) tools/gen_protos.py --check

bench: artifacts
	$(PY) benchmarks/run_benchmark.py

clean:
	rm -rf $(MODEL_DIR) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
