# Quick start:  make bench   (set up, then run the side-by-side head benchmark on `animals`)
#               make test    (set up, then run the test suite; .ci/run calls this)
# Setup is idempotent: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup bench test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Exact pins: pip takes these from local disk; a looser range downloads several GB.
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

bench: setup
	$(BIN)/protoknn benchmark

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs bench-out
