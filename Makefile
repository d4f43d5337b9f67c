# Two commands do everything (see README): `make demo` and `make test`. Both set themselves up first.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
# Without a GPU, take the CPU build of torch (a plain `pip install torch` may pull a multi-GB CUDA build).
TORCH   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.5" || echo "torch==2.13.0")

.PHONY: setup test-setup demo mini test gpu-bundle gpu-check

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

test-setup: setup
	bash tests/install-services.sh

# The demo, two jobs at a time, one core each (a tiny model gains little from a second thread, and loses much
# on a busy machine): its evaluation tasks; the teacher, pre-trained once, and its cache beside the NLL
# students (they need no teacher); the distilled students of the two seeds side by side (each sweep's own
# teacher and cache stages find them built); the report, over what finished whatever failed (the exit status
# says whether anything did). One process, one job at a time: python -m hldx.run -m +sweep=demo. Each sweep
# shows a line per job and its live line (--verbose: all its jobs write); the cache build's output goes to a log.
DEMO = $(BIN)/python -m hldx.run -m +sweep=demo hydra.sweeper.report=false
demo: setup
	@$(BIN)/python -m hldx.demotasks .hldx/demo-tasks
	@export OMP_NUM_THREADS=1; s=0; \
	$(BIN)/python -m hldx.cache build +sweep=demo method=hldc > .hldx/demo-cache.log 2>&1 & a=$$!; \
	$(DEMO) method=nll hydra.sweep.dir=multirun/demo-nll & b=$$!; \
	wait $$a && echo "the demo's teacher and its cache: built (log: .hldx/demo-cache.log)" || { s=1; \
	echo "the demo's teacher or its cache failed: .hldx/demo-cache.log says why"; }; wait $$b || s=1; \
	$(DEMO) method=kd,hldc,hldf seed=0 hydra.sweep.dir=multirun/demo-0 & a=$$!; \
	$(DEMO) method=kd,hldc,hldf seed=1 hydra.sweep.dir=multirun/demo-1 & b=$$!; \
	wait $$a || s=1; wait $$b || s=1; \
	$(BIN)/python -m analysis.report --experiment demo --out reports/demo; exit $$s  # over what finished

# The paper's protocol in miniature (sweeps/mini.yaml: 126 runs, two at a time), then its results page from the
# MLflow store (docs/mini-study.md), whatever failed. The same command after an interrupt finishes only the rest.
# MINI: more overrides of the study (a cut-down one in tests/test_mini.py); MINI_PAGE: where the page goes.
MINI      ?=
MINI_PAGE ?= docs/mini-study.md
mini: setup
	$(BIN)/python -m hldx.demotasks .hldx/demo-tasks
	s=0; $(BIN)/python -m hldx.run -m +sweep=mini $(MINI) || s=1; \
	$(BIN)/python -m analysis.page --experiment mini --out $(MINI_PAGE) --command "make mini" || s=1; exit $$s

test: test-setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -ra

# The GPU check (README: On a GPU). gpu-bundle, here: the wheels of what the check imports beyond the GPU machine's
# image, derived from its imports (tests/gpu_bundle.py). gpu-check, there: with that machine's python3 as it is
# (PY=... for another), the bundle installed offline; MODE=quick for a first contact.
MODE ?= full
gpu-bundle: setup
	$(BIN)/python tests/gpu_bundle.py .gpu-bundle

gpu-check:
	bash tests/gpu-check.sh $(MODE)
