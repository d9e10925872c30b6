# Quickstart targets. Both create .venv on first use (and again when a requirements file changes).
#   make run    set up and run the main job (CPU)
#   make test   set up and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The quickstart runs on the CPU; libtpu (installed for the TPU compile tests) would otherwise probe for a
# TPU at start-up. Run with JAX_PLATFORMS= (empty) to let jax pick an accelerator.
export JAX_PLATFORMS ?= cpu
# tcmalloc where the system has it (Debian / Ubuntu: apt install libtcmalloc-minimal4): with glibc's malloc XLA:CPU's
# large per-step buffers are fresh mmap pages, page-faulted every step; tcmalloc reuses them, same metrics, faster
# (docs/benchmarks.md, design measurements). `make run TCMALLOC=` turns it off.
LIBDIRS := /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib
TCMALLOC ?= $(firstword $(wildcard $(foreach d,$(LIBDIRS),$(d)/libtcmalloc_minimal.so.4 $(d)/libtcmalloc.so.4)))

.PHONY: run test setup setup-dev

$(VENV)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.runtime
setup-dev: $(VENV)/.dev

# Trains the tiny default on the embedded synthetic data (generated on first use); resumes from
# runs/tiny when it exists (rm -rf runs/tiny to start over).
run: $(VENV)/.runtime
	$(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC) )$(PY) -m experiments.train --config=experiments/configs/tiny.py \
		--workdir=runs/tiny

test: $(VENV)/.dev
	$(PY) -m pytest -n 2 --durations=15
