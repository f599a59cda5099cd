# cifar-serve developer commands. `make serve` and `make test` are all a fresh clone needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
MODEL_DIR ?= artifacts
NULL_MODEL_DIR ?= artifacts-null
CHECKPOINT ?= models/resnet18_cifar10.pt
STAMP := $(VENV)/.installed

PYTHON_VERSIONS ?= 3.10 3.13

.PHONY: help install artifacts artifacts-null serve test test-fast test-versions test-container lint typecheck gen check-gen bench bench-null bench-null-quick clean

help:
	@echo "make serve   - install into $(VENV), export the shipped model into $(MODEL_DIR)/, start the server on :50051"
	@echo "make test    - install into $(VENV) and run the whole test suite"
	@echo "make test-fast - the fast tier only (fake model: server, batcher, edge, settings), in seconds"
	@echo "make test-versions - the fast tier on Python $(PYTHON_VERSIONS) too"
	@echo "make test-container - build the Docker image, run it and the compose CPU stack (needs a Docker engine)"
	@echo "make gen     - regenerate the gRPC stubs from proto/"
	@echo "make lint    - ruff and mypy"
	@echo "make bench   - run the benchmark and update BENCHMARKS.md"
	@echo "make bench-null - the null-model benchmark alone (bench-null-quick: its plumbing, in seconds)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(MODEL_DIR)/manifest.json: $(STAMP) $(CHECKPOINT)
	$(BIN)/cifar-export --checkpoint $(CHECKPOINT) --out $(MODEL_DIR) --force

artifacts: $(MODEL_DIR)/manifest.json

# The null model: the served contract at microseconds per batch (benchmarks of the request path).
$(NULL_MODEL_DIR)/manifest.json: $(STAMP) export/exporter.py export/model.py
	$(BIN)/cifar-export --null-model --out $(NULL_MODEL_DIR) --force

artifacts-null: $(NULL_MODEL_DIR)/manifest.json

serve: artifacts
	$(BIN)/cifar-serve --model-dir $(MODEL_DIR)

# The API, reliability and shutdown tests run twice: one process, then --workers 2.
WORKER_TESTS ?= tests/test_server.py tests/test_oip.py tests/test_client.py tests/test_rest.py \
	tests/test_shm.py tests/test_reliability.py tests/test_operations.py tests/test_cli.py \
	tests/test_model_config.py tests/test_reload.py tests/test_balancing.py tests/test_int8.py \
	tests/test_null_model.py

test: artifacts
	$(BIN)/pytest
	CIFAR_SERVE_WORKERS=2 $(BIN)/pytest -m "not fast" $(WORKER_TESTS)

test-fast: $(STAMP)
	$(BIN)/pytest -m fast -q

test-versions: $(STAMP)
	tools/test_python_versions.sh $(PYTHON_VERSIONS)
# Not part of `make test`: builds the multi-GB image (TORCH_VARIANT=$(CONTAINER_TORCH)) from
# $(PYTHON_IMAGE) and runs it for real; skips, saying why, where no Docker engine can be started.
CONTAINER_TORCH ?= cuda
PYTHON_IMAGE ?= python:3.11-slim-bookworm
test-container: artifacts
	CIFAR_SERVE_TEST_CONTAINER=1 CIFAR_SERVE_TEST_TORCH_VARIANT=$(CONTAINER_TORCH) \
	CIFAR_SERVE_TEST_PYTHON_IMAGE=$(PYTHON_IMAGE) \
	$(BIN)/pytest tests/test_container.py -v -rs -p no:cacheprovider --timeout 3600

lint: $(STAMP)
	$(BIN)/ruff check export server client tests benchmarks tools examples deploy
	$(BIN)/ruff format --check export server client tests benchmarks tools examples deploy
	$(PY) tools/typecheck.py

gen: $(STAMP)
	$(PY) tools/gen_protos.py

check-gen: $(STAMP)
	$(PY) tools/gen_protos.py --check

# The null model first: the request path alone (issue 20), in ~6 minutes with two_processes.py,
# before the long runs.
bench: artifacts artifacts-null
	$(PY) benchmarks/null_model.py --model-dir $(NULL_MODEL_DIR)
	$(PY) benchmarks/two_processes.py --model-dir $(NULL_MODEL_DIR)
	$(PY) benchmarks/run_benchmark.py
	$(PY) benchmarks/perf_analyzer.py --profile
	$(PY) benchmarks/int8_rates.py --json benchmarks/int8-rates.json
	$(PY) benchmarks/int8_compare.py --rounds 3
	$(PY) benchmarks/perf_analyzer.py --label workers2 --server-arg=--workers=2
	$(PY) benchmarks/flag_compare.py --flag spin-wait --values true,false --title 'Spin-waiting under load' --rounds 2
	$(PY) benchmarks/flag_compare.py --flag batch-regroup --values false,true --title 'Regrouping after a batch' --rounds 2
	$(PY) benchmarks/flag_compare.py --flag batch-regroup --values false,true --title 'Regrouping after a batch, null model' \
		--section batch-regroup-null --model-dir $(NULL_MODEL_DIR) --rounds 2
	$(PY) benchmarks/flag_compare.py --flag max-batch-delay-ms --values 2,5 --title 'The batch delay' --rounds 2
	$(PY) benchmarks/flag_compare.py --flag max-batch-delay-ms --values 2,5 --title 'The batch delay, null model' \
		--section max-batch-delay-null --model-dir $(NULL_MODEL_DIR) --rounds 2
	$(PY) benchmarks/flag_compare.py --flag event-loop --values asyncio,uvloop --title 'The event loop' --rounds 2
	$(PY) benchmarks/flag_compare.py --flag event-loop --values asyncio,uvloop --title 'The event loop, null model' \
		--section event-loop-null --model-dir $(NULL_MODEL_DIR) --rounds 2
	$(PY) benchmarks/flag_compare.py --flag grpc-experiments --values=,-event_engine_listener \
		--title "gRPC's EventEngine listener" --rounds 2
	$(PY) benchmarks/flag_compare.py --flag grpc-experiments --values=,-event_engine_listener \
		--title "gRPC's EventEngine listener, null model" --section grpc-experiments-null \
		--model-dir $(NULL_MODEL_DIR) --rounds 2
	$(PY) benchmarks/shm_bench.py --json benchmarks/results-shm.json

bench-null: artifacts-null
	$(PY) benchmarks/null_model.py --model-dir $(NULL_MODEL_DIR)
	$(PY) benchmarks/two_processes.py --model-dir $(NULL_MODEL_DIR)

# Seconds-scale, numbers meaningless: checks the null-model benchmark's plumbing (prints its section).
bench-null-quick: artifacts-null
	$(PY) benchmarks/null_model.py --quick --model-dir $(NULL_MODEL_DIR)

clean:
	rm -rf $(MODEL_DIR) $(NULL_MODEL_DIR) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .venv-*
