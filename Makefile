# Set-up and the two commands the README promises: `make demo` and `make test`.
# The CPU build of torch 2.13.0 is installed first, so the library's own torch range
# never pulls a multi-GB CUDA build.
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
