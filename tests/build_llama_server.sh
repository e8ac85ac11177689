#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (an engine glmkit did not write) for
# tests/test_llamacpp_engine.py, from the llama.cpp source that PyPI's
# llama-cpp-python sdist vendors. Test-only: nothing is installed into the
# project's environment; the binary lands in $GLMKIT_LLAMA_DIR (default
# ~/.cache/glmkit-test/llama.cpp) as bin/llama-server.
#
#   PYTHON=.venv/bin/python bash tests/build_llama_server.sh     # once; a no-op when built
#
# Measured on a 2-core VM: 17m48s of CPU (user), 30 min of wall time while another test run
# shared the cores (about 10 min on idle ones); the sdist (77 MB) downloads in ~12 s.
# Needs: python -m pip (any), cmake, a C++17 compiler (Debian: cmake build-essential).
# Only PyPI is reached (the sdist); the web UI is not fetched (LLAMA_USE_PREBUILT_UI=OFF).
# Native CPU kernels: where the CPU reports AMX, start the server with --no-repack (its AMX
# kernels crashed on such a VM; tests/test_llamacpp_engine.py does).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DEST="${GLMKIT_LLAMA_DIR:-$HOME/.cache/glmkit-test/llama.cpp}"
PY="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"

if [ -x "$DEST/bin/llama-server" ]; then
    echo "llama-server already built: $DEST/bin/llama-server"
    exit 0
fi
command -v cmake >/dev/null && command -v c++ >/dev/null || {
    echo "need cmake and a C++ compiler (apt-get install -y cmake build-essential)" >&2; exit 1; }

mkdir -p "$DEST/src"
cd "$DEST/src"
sdist="llama_cpp_python-$VERSION.tar.gz"
[ -f "$sdist" ] || "$PY" -m pip download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d .
[ -d "llama_cpp_python-$VERSION" ] || tar xzf "$sdist"
src="$DEST/src/llama_cpp_python-$VERSION/vendor/llama.cpp"

# Only the server target; native CPU kernels (the binary runs where it was built).  Static,
# so bin/llama-server needs nothing from the build folder.
cmake -S "$src" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    >"$DEST/cmake.log" 2>&1
cmake --build "$DEST/build" --target llama-server -j "$JOBS" >"$DEST/build.log" 2>&1 \
    || { tail -n 30 "$DEST/build.log" >&2; exit 1; }
mkdir -p "$DEST/bin"
cp "$DEST/build/bin/llama-server" "$DEST/bin/llama-server"
echo "built $DEST/bin/llama-server"
