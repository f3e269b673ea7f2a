# Tessera's two entry points for a fresh machine: `make demo` and `make test`. Both run the idempotent set-up
# first (libtorch from PyPI's torch==2.11.0 into a shared, versioned virtual environment linked as .venv).
SHELL := /bin/bash
CARGO ?= cargo
TESSERA := target/debug/tessera

.PHONY: setup build demo demo-nodes test lint bench bench-allreduce bench-ckpt bench-recovery soak clean-runs

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build

# The showcase: a run on 2 CPU ranks under a kill, a hang and a loss spike, checked by `tessera chaos`.
demo: build
	@TESSERA=$(TESSERA) scripts/demo-corpus.sh data/demo
	rm -rf runs/demo
	$(TESSERA) chaos --config examples/demo.toml --schedule examples/demo-chaos.toml

# The same across two nodes, simulated on this machine: two launchers on loopback, one rank each.
demo-nodes: build
	@TESSERA=$(TESSERA) scripts/demo-corpus.sh data/demo
	rm -rf runs/demo
	$(TESSERA) chaos --config examples/demo.toml --schedule examples/demo-chaos.toml --nproc 1 --nnodes 2

# 60 random faults (every kind five times) on the tiny model; the result goes in BENCHMARKS.md.
soak: build
	@TESSERA=$(TESSERA) scripts/demo-corpus.sh data/demo
	rm -rf runs/soak
	$(TESSERA) chaos --config examples/soak.toml --random 60 --seed $${SEED:-1}

test: setup
	$(CARGO) test

bench: setup
	$(CARGO) bench --bench resume

bench-allreduce: setup
	scripts/bench-allreduce.sh

bench-ckpt: setup
	scripts/bench-ckpt.sh

bench-recovery: setup
	scripts/bench-recovery.sh

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

clean-runs:
	rm -rf runs
