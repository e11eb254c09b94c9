#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-bench (Release, CPU only) for benchmarks/serving.py and
# benchmarks/scale.py, from the llama.cpp
# source vendored in the llama-cpp-python sdist on PyPI (the only registry this machine reaches).
# Everything lives under ~/.cache/levante-bench/ (override with LEVANTE_BENCH_CACHE); a rerun finds
# the cached binary and only prints its path. The last line printed is always the binary's path.
#
#     bash benchmarks/build_llama_server.sh
set -euo pipefail

cache="${LEVANTE_BENCH_CACHE:-$HOME/.cache/levante-bench}"
binary="$cache/llama-server"
if [[ -x "$binary" ]]; then
    echo "$binary"
    exit 0
fi

python="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
[[ -x "$python" ]] || python=python3
mkdir -p "$cache"
cd "$cache"

sdist="$(ls llama_cpp_python-*.tar.gz 2>/dev/null | head -n 1 || true)"
if [[ -z "$sdist" ]]; then
    "$python" -m pip download --no-deps --no-binary :all: --dest "$cache" llama-cpp-python >&2
    sdist="$(ls llama_cpp_python-*.tar.gz | head -n 1)"
fi
src="$cache/${sdist%.tar.gz}"
[[ -d "$src" ]] || tar -xzf "$sdist"
llama="$src/vendor/llama.cpp"

# The server only loads a local file over plain HTTP on loopback: no TLS (LLAMA_OPENSSL, which replaced
# the curl dependency), and no web UI (LLAMA_USE_PREBUILT_UI would try to download it at build time).
# Not -march=native: on this machine kind's Intel CPUs ggml's AMX kernels die with SIGILL. The
# CPU's own AVX/AVX-512 extensions are turned on one by one instead, and AMX off.
has() { grep -qw "$1" /proc/cpuinfo; }
isa=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
for flag in avx:AVX avx2:AVX2 fma:FMA f16c:F16C avx512f:AVX512 avx512_vbmi:AVX512_VBMI \
    avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVXVNNI; do
    if has "${flag%%:*}"; then isa+=("-DGGML_${flag##*:}=ON"); else isa+=("-DGGML_${flag##*:}=OFF"); fi
done
cmake -S "$llama" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=OFF -DGGML_METAL=OFF \
    -DGGML_VULKAN=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON "${isa[@]}" >&2
cmake --build "$cache/build" --target llama-server llama-bench -j2 >&2
# Link the built binary (not a copy) so it keeps finding the shared ggml/llama libraries beside it.
ln -sf "$cache/build/bin/llama-server" "$binary"
echo "$binary"
