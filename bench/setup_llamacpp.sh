#!/usr/bin/env bash
# Benchmark-only environment with llama.cpp (via llama-cpp-python, which builds llama.cpp from
# source on this machine) and the tools to convert checkpoints to GGUF. Never a glmkit dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BENCH_VENV:-.bench-venv}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==2.13.0" numpy sentencepiece safetensors
CMAKE_ARGS="-DGGML_NATIVE=ON" "$VENV/bin/pip" install -q --no-cache-dir "llama-cpp-python"
"$VENV/bin/pip" install -q -e .
echo "bench environment ready: $VENV"
