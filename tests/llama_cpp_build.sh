#!/usr/bin/env bash
# Build llama.cpp's `llama-completion` and `llama-simple` (CPU only) from the source that
# llama-cpp-python 0.3.36's sdist vendors, once per machine, into a cache folder outside git:
#   ${LORA_ALPACA_CACHE:-${XDG_CACHE_HOME:-~/.cache}/lora_alpaca}/llama.cpp-0.3.36/bin/
# Prints that bin folder. Reused when present. .ci/run calls it before the suite (so CI pays
# the few minutes of compiling once, outside the tests' time); tests/test_llama_cpp.py calls
# it when the binaries are missing. Needs pip, cmake, ninja and a C++17 compiler.
# Cost: ~180 MB of source while building (deleted after), about 5 min on 2 cores.
set -euo pipefail

VERSION=0.3.36
CACHE="${LORA_ALPACA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora_alpaca}"
DEST="$CACHE/llama.cpp-$VERSION"
BIN="$DEST/bin"
JOBS="${LLAMA_CPP_BUILD_JOBS:-2}"

if [[ -x "$BIN/llama-completion" && -x "$BIN/llama-simple" ]]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$CACHE"
# One build at a time per cache (parallel test runs / CI steps wait for each other).
exec 9>"$CACHE/.llama.cpp-$VERSION.lock"
flock 9
if [[ -x "$BIN/llama-completion" && -x "$BIN/llama-simple" ]]; then
  echo "$BIN"
  exit 0
fi

PY="${PYTHON:-python}"
for tool in cmake ninja; do
  command -v "$tool" >/dev/null 2>&1 || "$PY" -m pip install -q "$tool" >&2
done

WORK="$(mktemp -d "$CACHE/.llama.cpp-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "building llama.cpp (llama-cpp-python $VERSION sources) in $WORK, once" >&2
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

# Static, CPU only, no network code, no tests/server/web UI: only what the two targets need.
nice cmake -S "$SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON \
  >&2
nice cmake --build "$WORK/build" -j "$JOBS" --target llama-completion llama-simple >&2

mkdir -p "$WORK/out/bin"
cp "$WORK/build/bin/llama-completion" "$WORK/build/bin/llama-simple" "$WORK/out/bin/"
echo "$VERSION" >"$WORK/out/VERSION"
rm -rf "$DEST"
mv "$WORK/out" "$DEST"  # one rename: a killed build never leaves half a cache
echo "$BIN"
