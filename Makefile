# Two entry points on a fresh machine (both make the virtual environment at .venv):
#   make demo   set up, export the built-in default model to ONNX, GGUF and Core ML, stream an answer
#   make test   set up with the test extras and run the test suite (then android_demo's browser and JVM tests)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/python -m pip
# llama-cpp-python compiles llama.cpp; built with -march=native on CPUs with AMX, its AMX kernels crash at the
# first decode (ggml_backend_amx_mul_mat), so the AMX instructions are switched off for both compilers.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
export CMAKE_ARGS := -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)' -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
DEMO_BUNDLE := bundles/default
PROMPT ?= def fibonacci(n):\n

.PHONY: demo test setup setup-dev browser bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# runtime + every exporter (llama-cpp-python is compiled here, about 5 minutes on 2 cores, once per pip cache)
$(VENV)/.setup: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[gguf,coreml,genai,bench]'
	touch $@

# test extras: torch==2.13.0 first (the CPU build on this machine's disk), so transformers pulls no CUDA build
$(VENV)/.setup-dev: $(VENV)/.setup
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[gguf,coreml,genai,bench,qnn,serve,dev]'
	touch $@

# the chat page's test (tests/test_serve_page.py) drives Debian's chromium headless; without it that test skips and
# says why. Installed as root (CI) or through passwordless sudo; anywhere else this prints a note.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    { $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; } || \
	    echo "note: chromium could not be installed; tests/test_serve_page.py will skip"; \
	  else echo "note: no chromium, and no root for apt-get; tests/test_serve_page.py will skip"; fi; }

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev browser

demo: setup
	$(VENV)/bin/edgephi export default -o $(DEMO_BUNDLE) --force
	$(VENV)/bin/edgephi run $(DEMO_BUNDLE) -p $$'$(PROMPT)' --raw --max-tokens 64 --temperature 0.8 --top-p 0.95 --seed 1 --verbose

test: setup-dev
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider
	$(MAKE) -C android_demo test  # the browser runtime in Chromium and the Android core's JVM tests

bench: setup
	$(VENV)/bin/edgephi bench --shape phi-3-mini --peers

clean:
	rm -rf $(VENV) bundles
