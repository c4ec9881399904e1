# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

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
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_hybrid.py --config bench
	$(BIN)/python benchmarks/bench_hybrid.py --config demo
	$(BIN)/python benchmarks/bench_elastic_step.py
	$(BIN)/python benchmarks/bench_serving_memory.py demo_out/run
	$(BIN)/python benchmarks/bench_kd_memory.py
	$(BIN)/python benchmarks/bench_moe_grouped.py
	$(BIN)/python benchmarks/bench_fsdp_memory.py

clean:
	rm -rf $(VENV) demo_out
