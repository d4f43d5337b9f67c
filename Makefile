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

# The demo: its evaluation tasks; the teacher, pre-trained once, and its cache (both cores); then the two seeds'
# students at once, one core each (tiny models use a second thread poorly); then the report.
demo: setup
	$(BIN)/python -m hldx.demotasks .hldx/demo-tasks
	OMP_NUM_THREADS=2 $(BIN)/python -m hldx.cache build +sweep=demo method=hldc
	OMP_NUM_THREADS=1 $(BIN)/python -m hldx.run -m +sweep=demo seed=0 hydra.sweep.dir=multirun/demo-0 & a=$$!; \
	OMP_NUM_THREADS=1 $(BIN)/python -m hldx.run -m +sweep=demo seed=1 hydra.sweep.dir=multirun/demo-1 & b=$$!; \
	wait $$a && wait $$b
	$(BIN)/python -m analysis.report --experiment demo --out reports/demo

test: test-setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -ra

gpu-check: setup
	bash tests/gpu-check.sh
