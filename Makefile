# Set-up and the two commands the README promises: `make demo` and `make test`.
# torch is pinned to 2.13.0 and installed first, so the library's own torch range never pulls a newer
# release. Which build pip takes depends on the machine: the CI machines provide a CPU build locally;
# from PyPI on Linux x86_64 it is the (much larger) CUDA build. For a CPU-only build elsewhere, put
# it into .venv first: .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.offsite-installed

.PHONY: demo test test-slow lint bench setup protos

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/offsite demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# The tests marked slow (a 1 GiB bundle served, 32 data owners at once against a real server: about
# 2 minutes); CI runs them after `make test`.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_emulator.py

# Regenerate the committed gRPC code in protos/v1 from protos/offsite/v1/offsite.proto.
protos: $(STAMP)
	$(BIN)/python -m offsite.wire.generate
