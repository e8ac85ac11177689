#!/usr/bin/env bash
# llama.cpp's own `llama-bench`, built natively (-DGGML_NATIVE=ON: every instruction set this CPU
# has, as a user who builds llama.cpp gets it) from the llama.cpp source vendored in the
# llama-cpp-python sdist.  Benchmark-only, never a glmkit dependency; ~10 minutes on 2 cores.
# On this host class the native build includes llama.cpp's AMX path, which crashes (SIGSEGV at
# ldtilecfg) unless weights are left unrepacked: run it as `llama-bench --repack 0`.
#     bash bench/setup_llamacpp_native.sh [DIR]      -> DIR/build/bin/llama-bench (default .llamacpp)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.llamacpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
mkdir -p "$DIR"
if [ ! -d "$DIR/src/vendor/llama.cpp" ]; then
  python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR"
  mkdir -p "$DIR/src"
  tar -xzf "$DIR"/llama_cpp_python-"$VERSION".tar.gz -C "$DIR/src" --strip-components=1
fi
cmake -S "$DIR/src/vendor/llama.cpp" -B "$DIR/build" -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
cmake --build "$DIR/build" --target llama-bench -j "$(nproc)" >/dev/null
echo "llama-bench ready: $DIR/build/bin/llama-bench"
