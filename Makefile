# Two commands do everything (see README): `make demo` and `make test`. Both set themselves up first.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
# Without a GPU, take the CPU build of torch (a plain `pip install torch` may pull a multi-GB CUDA build).
TORCH   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.5" || echo "torch==2.13.0")

.PHONY: setup test-setup demo test gpu-check

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

test-setup: setup
	bash tests/install-services.sh

demo: setup
	$(BIN)/python -m hldx.run -m +sweep=demo
	$(BIN)/python -m analysis.report --experiment demo --out reports/demo

test: test-setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -ra

gpu-check: setup
	bash tests/gpu-check.sh
