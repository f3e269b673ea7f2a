# Tessera's two entry points for a fresh machine: `make demo` and `make test`. Both run the idempotent set-up
# first (libtorch from PyPI's torch==2.11.0 into a shared, versioned virtual environment linked as .venv).
SHELL := /bin/bash
CARGO ?= cargo
TESSERA := target/debug/tessera

.PHONY: setup build demo test lint bench bench-allreduce bench-ckpt bench-recovery clean-runs

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build

demo: build
	@TESSERA=$(TESSERA) scripts/demo-corpus.sh data/demo
	$(TESSERA) train --config examples/demo.toml

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
