#!/usr/bin/env bash
# Benchmark-only environment with llama.cpp (via llama-cpp-python, which builds llama.cpp from
# source on this machine) and the tools to convert checkpoints to GGUF. Never a glmkit dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BENCH_VENV:-.bench-venv}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==2.13.0" numpy sentencepiece safetensors
# AVX-512 kernels, but no AMX: on this machine class llama.cpp's AMX int8 path dies with a general
# protection fault on any multi-token batch of Q4_0/Q8_0 weights (seen with llama-cpp-python 0.3.36).
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
  -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
  -DGGML_AMX_BF16=OFF" "$VENV/bin/pip" install -q --no-cache-dir --force-reinstall --no-deps "llama-cpp-python"
"$VENV/bin/pip" install -q "llama-cpp-python"   # its pure-Python dependencies
"$VENV/bin/pip" install -q -e .
echo "bench environment ready: $VENV"
