#!/usr/bin/env bash
# Builds the CLI, the node and the GStreamer plugin with `--features cuda` on a machine
# without a GPU or a CUDA installation, to check that the CUDA build compiles and links.
#
# The toolkit comes from the Python package index into a private prefix (.cuda/): the
# CUDA 13 wheels (nvidia-cuda-nvcc, -runtime, -cccl, nvidia-cublas) lay out a usable
# toolkit (bin/nvcc, include/, lib/, nvvm/). CUDA 12's nvcc wheels carry ptxas only (no
# nvcc, checked for 12.2, 12.6, 12.8 and 12.9), so they cannot compile anything. On a
# machine with a real toolkit (a Jetson's JetPack: /usr/local/cuda), set CUDA_HOME and
# nothing is downloaded.
#
#   scripts/cuda-build.sh                      # sm_87 (Jetson Orin) and sm_89 (RTX 40xx, L4)
#   CUDA_ARCHS="87" scripts/cuda-build.sh      # Orin only (about half the compile time)
#   CUDA_HOME=/usr/local/cuda scripts/cuda-build.sh
#
# How it builds, and why:
# - ggml is built as shared libraries (LLAMA_BUILD_SHARED_LIBS=1): llama-cpp-sys-2 links
#   CUDA statically otherwise, and the wheels have no cublas_static or culibos.
#   llama-cpp-sys-2 puts the libraries next to the binaries; they find them (and the
#   toolkit's libcudart/libcublas) through their rpath.
# - GGML_CUDA_NO_VMM=ON: the driver library (libcuda.so) comes with the NVIDIA driver,
#   not the toolkit; without it ggml allocates with cudaMalloc instead of virtual memory.
# - The binaries go to target-cuda/ (CARGO_TARGET_DIR), apart from the CPU build.
# At the end `paligemma devices` runs: here (no driver) it lists the CPU only.
#
# Needs the packages that .ci/run installs (clang, cmake, GStreamer's -dev packages),
# and pip (python3-pip on Debian) for the download.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${CUDA_PREFIX:-$ROOT/.cuda}
ARCHS=${CUDA_ARCHS:-"87;89"}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-cuda}
start=$(date +%s)

if [ -z "${CUDA_HOME:-}" ]; then
    CUDA_HOME=$PREFIX/nvidia/cu13
    if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
        echo "== CUDA toolkit from PyPI into $PREFIX"
        python3 -m pip --version >/dev/null 2>&1 || apt-get install -y -qq python3-pip >/dev/null
        mkdir -p "$PREFIX/wheels"
        python3 -m pip download --quiet --only-binary=:all: --python-version 3.11 \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
            -d "$PREFIX/wheels" "nvidia-cuda-nvcc==13.5.*" "nvidia-cuda-runtime==13.5.*" "nvidia-cuda-cccl" "nvidia-cublas"
        for w in "$PREFIX"/wheels/*.whl; do python3 -m zipfile -e "$w" "$PREFIX"; done
        chmod +x "$CUDA_HOME"/bin/* "$CUDA_HOME"/nvvm/bin/*
        # Link-time names (the wheels ship only the versioned sonames), and lib64 where
        # CMake's FindCUDAToolkit looks first.
        for lib in cudart cublas cublasLt; do
            ln -sf "$(basename "$(ls "$CUDA_HOME/lib/lib$lib.so."* | head -1)")" "$CUDA_HOME/lib/lib$lib.so"
        done
        ln -sfn lib "$CUDA_HOME/lib64"
    fi
fi
echo "== toolkit: $("$CUDA_HOME/bin/nvcc" --version | tail -2 | head -1)"
echo "== architectures: $ARCHS, target dir: $CARGO_TARGET_DIR"

export CUDA_HOME CUDA_PATH=$CUDA_HOME CUDACXX=$CUDA_HOME/bin/nvcc PATH=$CUDA_HOME/bin:$PATH
export CMAKE_CUDA_ARCHITECTURES=$ARCHS GGML_CUDA_NO_VMM=ON LLAMA_BUILD_SHARED_LIBS=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export RUSTFLAGS="-C target-cpu=native -C link-arg=-Wl,-rpath,\$ORIGIN -C link-arg=-Wl,-rpath,$CUDA_HOME/lib"

cd "$ROOT"
cargo build --release --features cuda -p paligemma-cli -p paligemma-node -p gst-paligemma
built=$(date +%s)

out=$CARGO_TARGET_DIR/release
# llama-cpp-sys-2 links only the unversioned names of the libraries next to the
# binaries, and those are relative symlinks that dangle there: copy the libraries
# (and their soname links) from its build.
# A binary's runpath is not searched for what its libraries need (libggml.so needs
# libggml-cuda.so, which needs libcudart and libcublas): give the libraries their own.
libdir=$(dirname "$(ls -t "$CARGO_TARGET_DIR"/release/build/llama-cpp-sys-2-*/out/lib*/libggml-cuda.so.*.* | head -1)")
cp -a "$libdir"/libggml*.so.* "$out/"
command -v patchelf >/dev/null || apt-get install -y -qq patchelf >/dev/null
for lib in "$out"/libggml*.so.*.*; do patchelf --set-rpath "\$ORIGIN:$CUDA_HOME/lib" "$lib"; done
echo "== built in $((built - start)) s"
ls -laL "$out/paligemma" "$out/paligemma-node" "$out/libgstpaligemma.so" "$out"/libggml*.so.*.* | awk '{printf "%10d  %s\n", $5, $NF}'
echo "== $out/paligemma devices"
"$out/paligemma" devices
