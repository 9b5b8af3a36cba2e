# yoloqat: the README's two commands.
#   make run   set up (venv, git, DVC) and run the whole pipeline on the embedded dataset
#   make test  set up and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.yoloqat-installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

# DVC commits experiments; give it an identity only when none is configured, through the
# environment, so the user's global git config is never touched.
ifeq ($(shell git config user.name 2>/dev/null),)
export GIT_AUTHOR_NAME ?= yoloqat
export GIT_COMMITTER_NAME ?= yoloqat
endif
ifeq ($(shell git config user.email 2>/dev/null),)
export GIT_AUTHOR_EMAIL ?= yoloqat@localhost
export GIT_COMMITTER_EMAIL ?= yoloqat@localhost
endif

.PHONY: setup lock dvc-yaml repo run pipeline test lint bench gpu-check demo-collapse clean-results

setup: $(STAMP)

# The pinned dependency set `make setup` installs (every package, version and file hash), one
# per set of extras make uses; `make lock` writes them from pyproject.toml (see there).
LOCK := locks/cpu-dev.txt
OPENVINO_LOCK := locks/cpu-dev-openvino.txt

# TORCH_INDEX: an extra wheel index for torch, e.g. PyTorch's CPU-only one
# (https://download.pytorch.org/whl/cpu), which makes .venv several GB smaller; default: none.
# The lock pins PyPI's torch (with its CUDA libraries), so TORCH_INDEX installs unlocked.
TORCH_INDEX ?=

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "make: installing the project and its dependencies into $(VENV) (a few minutes; torch is large)"
ifeq ($(TORCH_INDEX),)
	$(PY) -m pip install -r $(LOCK)
	$(PY) -m pip install --no-deps -e .
else
	$(PY) -m pip install --extra-index-url $(TORCH_INDEX) -e '.[cpu,dev]'
endif
	@touch $@

# Rewrites the locks from pyproject.toml with uv (installed into $(VENV) on first use), for every
# platform and Python that requires-python admits. Versions already in a lock are kept unless
# pyproject.toml excludes them: `make lock LOCK_ARGS=--upgrade` moves everything to the newest
# release, `LOCK_ARGS='--upgrade-package dvc'` one package. The OpenVINO lock is the same set
# plus openvino (constrained by the first lock).
PYTHON_MIN := $(shell sed -n 's/^requires-python = ">=\([0-9.]*\).*/\1/p' pyproject.toml)
UV_COMPILE = $(PY) -m uv pip compile pyproject.toml --quiet --universal --python-version $(PYTHON_MIN) \
	--generate-hashes --custom-compile-command "make lock" $(LOCK_ARGS)
LOCK_ARGS ?=

lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m uv --version >/dev/null 2>&1 || $(PY) -m pip install --quiet 'uv>=0.9,<1'
	$(UV_COMPILE) --extra cpu --extra dev -o $(LOCK)
	$(UV_COMPILE) --extra cpu --extra dev --extra openvino -c $(LOCK) -o $(OPENVINO_LOCK)

# dvc exp run needs a git repository with at least one commit and an initialised DVC.
repo:
	@git rev-parse --is-inside-work-tree >/dev/null 2>&1 || git init -q
	@test -d .dvc || dvc init -q
	@git rev-parse --verify -q HEAD >/dev/null || { git add -A && git commit -q -m "yoloqat: initial commit"; }

run: setup repo pipeline

# the pipeline on the embedded default, then a readable table (pixi's `run` task starts here)
pipeline:
	dvc exp run
	@yoloqat exps

# The OpenVINO tests need the optional runtime: installed when its wheel is reachable, else they
# skip (the stamp is only written on success, so the next `make test` tries again).
OPENVINO_STAMP := $(VENV)/.yoloqat-openvino

$(OPENVINO_STAMP): $(STAMP) $(OPENVINO_LOCK)
	@$(PY) -m pip install --quiet -r $(OPENVINO_LOCK) && touch $@ \
	  || echo "make: OpenVINO could not be installed; its tests will be skipped"

# One pytest worker per CPU (pytest-xdist), each on one thread, a test file per worker (its
# module fixtures are built once): 552 s -> 357 s of pytest on 2 cores (docs/reproducibility.md).
TEST_ARGS := -n auto --dist loadfile

test: setup $(OPENVINO_STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(TEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src stages tests benchmarks tools

# dvc.yaml's source deps from the stages' imports, after adding, removing or moving an import
# (tests/test_layout.py fails and names this command when they differ).
dvc-yaml: setup
	$(PY) tools/dvc_deps.py

bench: setup
	$(PY) benchmarks/qat_step_time.py

# On a one-GPU machine: the CUDA step benchmark, the CUDA tests and the pipeline at a bigger
# budget on a temporary copy, then one summary (docs/gpu.md).  Offline; without a CUDA device
# it prints one line and exits 0.  No `setup` prerequisite: a GPU box may have no registry,
# so it runs with .venv's python when there is one, else python3 (packages on PYTHONPATH).
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_CHECK_ARGS ?=

gpu-check:
	PYTHONUNBUFFERED=1 PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# The failure found on the embedded data (preset collapse_cpu, reports/README.md "Looking for the collapse"),
# run into the workspace, then its paired verdicts: the deployed (EMA), EMA and live curves.
demo-collapse: setup repo
	dvc exp run -S preset=collapse_cpu
	@yoloqat judge results/qat
