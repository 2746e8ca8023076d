# Quick start:  make bench   (set up, then run the side-by-side head benchmark on `animals`)
#               make test    (set up, then run the test suite; .ci/run calls this)
# Setup is idempotent: the venv is rebuilt only when pyproject.toml or constraints.txt change.
# It installs the package (editable) with the extra `all` (every extra but cabrnet, which
# tests/cabrnet_ci.sh puts in a venv of its own), at the exact versions of constraints.txt.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip install -q --progress-bar off -c constraints.txt

.PHONY: setup bench test wheel clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: constraints.txt names the versions that lie on local disk (a looser
	# choice downloads several GB).
	$(PIP) torch torchvision
	$(PIP) -e '.[all]'
	touch $(STAMP)

bench: setup
	$(BIN)/protoknn benchmark

test: setup
	$(BIN)/python -m pytest -q

# sdist + wheel into dist/ (what CI installs into a fresh venv)
wheel: setup
	rm -rf dist && $(BIN)/python -m build --outdir dist .

clean:
	rm -rf $(VENV) runs bench-out dist
