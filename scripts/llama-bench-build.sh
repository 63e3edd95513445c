#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench` on the very llama.cpp and ggml sources our engine is
# built from (the llama-cpp-sys-2 crate in Cargo.lock), so that
# `paligemma bench --vs-llama-bench` compares two engines on one ggml. That crate ships
# llama.cpp without its tools, so llama-bench's own two files come from the
# llama-cpp-python source package on PyPI (LLAMA_CPP_PYTHON, default 0.3.36), laid over
# a copy of our sources. Release, GGML_NATIVE, otherwise llama.cpp's defaults (OpenMP
# on), into target/llama-bench. Prints the binary's path.
#
# LLAMA_BENCH_CPU=avx2 builds ggml for AVX2 + FMA + F16C only (GGML_NATIVE off), into
# target/llama-bench-avx2: the baseline for our AVX2 kernels
# (PALIGEMMA_CPU_KERNELS=avx2) on a machine that has more.
set -euo pipefail
cd "$(dirname "$0")/.."
py_version=${LLAMA_CPP_PYTHON:-0.3.36}
version=$(awk '/^name = "llama-cpp-sys-2"/ { getline; gsub(/[" ]/, "", $0); sub(/version=/, "", $0); print; exit }' Cargo.lock)
cargo fetch >/dev/null
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"llama-cpp-sys-2-$version"/llama.cpp 2>/dev/null | head -1)
[ -n "$src" ] || { echo "llama-cpp-sys-2 $version is not in the cargo registry" >&2; exit 1; }
cpu=${LLAMA_BENCH_CPU:-native}
case $cpu in
    native) out=$PWD/target/llama-bench; isa=(-DGGML_NATIVE=ON) ;;
    avx2) out=$PWD/target/llama-bench-avx2
          isa=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON) ;;
    *) echo "LLAMA_BENCH_CPU=$cpu: expected native or avx2" >&2; exit 1 ;;
esac
stamp="$src llama-cpp-python-$py_version $cpu"
if [ -x "$out/build/bin/llama-bench" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "$out/build/bin/llama-bench"
    exit 0
fi
for tool in cmake c++ pip3; do
    command -v $tool >/dev/null || { echo "$tool is needed (apt-get install cmake build-essential python3-pip)" >&2; exit 1; }
done
rm -rf "$out/src" "$out/pypi"
mkdir -p "$out/pypi"
pip3 download --quiet --no-deps --no-binary :all: -d "$out/pypi" "llama-cpp-python==$py_version" >&2
tar -xzf "$out/pypi"/llama_cpp_python-*.tar.gz -C "$out/pypi" --wildcards '*/vendor/llama.cpp/tools/llama-bench/*'
cp -r "$src" "$out/src"
chmod -R u+w "$out/src"
cp "$out/pypi"/llama_cpp_python-*/vendor/llama.cpp/tools/llama-bench/{CMakeLists.txt,llama-bench.cpp,main.cpp} "$out/src/tools/llama-bench/"
echo 'add_subdirectory(llama-bench)' > "$out/src/tools/CMakeLists.txt"
echo "building llama-bench from $src (about 10 min on 2 cores) ..." >&2
cmake -S "$out/src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release "${isa[@]}" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_APP=OFF >&2
cmake --build "$out/build" --target llama-bench -j "$(nproc)" >&2
echo "$stamp" > "$out/stamp"
echo "$out/build/bin/llama-bench"
