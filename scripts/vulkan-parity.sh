#!/usr/bin/env bash
# The engine's parity tests on ggml's Vulkan backend, on Mesa's lavapipe (llvmpipe)
# software Vulkan device: no GPU needed. Not part of the default CI run (the Vulkan
# build of ggml alone takes ~20 min on 2 cores, the tests ~8 min the first time
# while lavapipe compiles ggml's shaders, seconds once they are cached). Run it on
# Debian 12 as root (or with sudo):
#
#     $ scripts/vulkan-parity.sh
#
# What it does:
#   1. installs the Debian 12 packages of the Vulkan build and runtime (idempotent);
#   2. fetches, with a private apt state under target/vulkan-deps (nothing in /etc/apt
#      or the installed packages changes), and unpacks there:
#        - the Vulkan headers of Debian 13 (`libvulkan-dev` 1.4.x of trixie): Debian
#          12's (1.3.239) are too old for the pinned ggml;
#        - lavapipe of Mesa 25 (`mesa-vulkan-drivers` of bookworm-backports, built for
#          Debian 12): Debian 12's Mesa 22.3 lavapipe crashes inside its own threads on
#          these graphs (SIGSEGV / heap corruption); it is used through VK_ICD_FILENAMES;
#      each is skipped when the system's own is new enough;
#   3. builds the parity tests and the CLI with `--features vulkan` in target/vulkan
#      (the main target dir is left alone);
#   4. checks that `paligemma devices` lists the lavapipe device as vulkan:0;
#   5. runs the parity tests on vulkan:0 twice:
#        a. with GGML_VK_DISABLE_F16=1 (ggml's f32 matmul shaders): the f32 per-stage
#           test at the CPU's tolerance, 1e-4 (measured: <= 7.2e-6);
#        b. as ggml runs on any fp16-capable GPU: its matmul shaders round f32 inputs
#           to f16 in shared memory (ggml-vulkan's FLOAT_TYPE), so the f32 per-stage
#           test gets a looser tolerance, 2e-2 (measured: <= 9.9e-3, on the prefix
#           logits); then the quantized test with its own thresholds;
#   6. prints how long the build and the tests took; exits non-zero on any failure.
#
# Environment:
#   VULKAN_PARITY_TOL_F32   tolerance of run a (default 1e-4)
#   VULKAN_PARITY_TOL       tolerance of run b (default 2e-2)
#   VULKAN_PARITY_TESTS     test filters of run b (default: the f32 per-stage test and
#                           the quantized one; "" runs every test of tests/parity.rs)
#   CARGO_TARGET_DIR        default target/vulkan
#   CARGO_BUILD_JOBS        parallel jobs (cargo's default otherwise)
#   MESA_SHADER_CACHE_DIR   lavapipe's shader cache (default target/vulkan-deps/shader-cache)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

export DEBIAN_FRONTEND=noninteractive
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/vulkan}
# ggml leaves CPU-type Vulkan devices (lavapipe) out unless they are named.
export GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0}
export PALIGEMMA_TEST_DEVICE=${PALIGEMMA_TEST_DEVICE:-vulkan:0}
TOL_F32=${VULKAN_PARITY_TOL_F32:-1e-4}
TOL=${VULKAN_PARITY_TOL:-2e-2}
TESTS=${VULKAN_PARITY_TESTS-f32_matches_reference_per_stage quantized_types_stay_close}
DEPS=$ROOT/target/vulkan-deps
T_START=$(date +%s)

step() { echo; echo "== $*"; }
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

# 1. Debian 12 packages. glslc: the shader compiler (bookworm's 2023.2 is new enough;
# the newer extensions ggml probes for, such as cooperative matrices, are optional);
# spirv-headers: ggml-vulkan's find_package(SPIRV-Headers); libvulkan1 and
# libvulkan-dev: the loader and its .so to link; mesa-vulkan-drivers: lavapipe (and
# the libraries the newer one below needs); vulkan-tools: vulkaninfo; python3: ggml
# embeds its shaders with a Python helper; the rest: the usual build of ggml-sys.
step "system packages"
PKGS="libclang-dev clang cmake pkg-config build-essential python3 \
      glslc spirv-headers libvulkan1 libvulkan-dev mesa-vulkan-drivers vulkan-tools"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "installing:$missing"
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
else
    echo "all present"
fi

# 2. Newer Vulkan headers and lavapipe where the system's are too old, fetched with a
# private apt state (the sources, lists and downloads all live under $DEPS/apt).
header_version() { sed -n 's/^#define VK_HEADER_VERSION \([0-9]*\).*/\1/p' "$1/vulkan/vulkan_core.h" 2>/dev/null || true; }
mesa_major=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers | sed 's/^[0-9]*://; s/\..*//')
need_headers=0
need_mesa=0
[ "$(header_version /usr/include)" -ge 309 ] 2>/dev/null || need_headers=1
[ "$mesa_major" -ge 24 ] 2>/dev/null || need_mesa=1

APT=$DEPS/apt
APT_OPTS=(-o "Dir::Etc::sourcelist=$APT/etc/sources.list" -o "Dir::Etc::sourceparts=-"
          -o "Dir::State=$APT" -o "Dir::State::Lists=$APT/lists"
          -o "Dir::State::status=/var/lib/dpkg/status" -o "Dir::Cache=$APT/cache"
          -o "APT::Sandbox::User=root")
apt_private_updated=0
fetch() { # fetch PACKAGE/SUITE DEST: downloads a .deb of SUITE and unpacks it into DEST
    if [ "$apt_private_updated" = 0 ]; then
        mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/etc" "$APT/debs"
        {
            echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main"
            echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main"
        } >"$APT/etc/sources.list"
        apt-get "${APT_OPTS[@]}" update -qq
        apt_private_updated=1
    fi
    local pkg=${1%/*}
    rm -f "$APT/debs/${pkg}"_*.deb
    (cd "$APT/debs" && apt-get "${APT_OPTS[@]}" download -qq "$1")
    rm -rf "$2"
    dpkg -x "$APT/debs/${pkg}"_*.deb "$2"
}

step "Vulkan headers"
if [ "$need_headers" = 1 ]; then
    VK_INCLUDE=$DEPS/headers/usr/include
    [ "$(header_version "$VK_INCLUDE")" -ge 309 ] 2>/dev/null || fetch libvulkan-dev/trixie "$DEPS/headers"
    # First on every C/C++ include path of the build (ggml-vulkan's CMake finds
    # /usr/include, which compilers search last). The library linked stays Debian
    # 12's loader (libvulkan.so.1), which is fine for the newer headers.
    export CFLAGS="-I$VK_INCLUDE ${CFLAGS:-}"
    export CXXFLAGS="-I$VK_INCLUDE ${CXXFLAGS:-}"
    export CPATH="$VK_INCLUDE${CPATH:+:$CPATH}"
else
    VK_INCLUDE=/usr/include
fi
echo "$VK_INCLUDE: VK_HEADER_VERSION $(header_version "$VK_INCLUDE")"

step "lavapipe"
if [ "$need_mesa" = 1 ]; then
    LVP=$DEPS/mesa/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so
    [ -f "$LVP" ] || fetch mesa-vulkan-drivers/bookworm-backports "$DEPS/mesa"
    # The package's ICD file names the library without a path: write one with it.
    printf '{ "file_format_version": "1.0.0", "ICD": { "library_path": "%s", "api_version": "1.4.305" } }\n' \
        "$LVP" >"$DEPS/mesa/lvp_icd.json"
    export VK_ICD_FILENAMES=$DEPS/mesa/lvp_icd.json
    echo "Mesa $mesa_major of the system is too old; using $LVP"
fi
# lavapipe compiles every ggml pipeline with LLVM on first use (most of a cold run's
# time); its disk cache is kept with the other downloads (remove it for a cold run).
export MESA_SHADER_CACHE_DIR=${MESA_SHADER_CACHE_DIR:-$DEPS/shader-cache}
if ! vulkaninfo --summary 2>/dev/null | grep -E 'deviceName|driverInfo'; then
    echo "FAIL: vulkaninfo finds no Vulkan device" >&2
    exit 1
fi

# 3. Build.
step "build (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
t0=$(date +%s)
cargo test --release -p paligemma --features vulkan --test parity --no-run
cargo build --release -p paligemma-cli --features vulkan
t1=$(date +%s)

# 4. The CLI's device list: lavapipe must be vulkan:0, and its test matmul must be right.
step "paligemma devices"
devices=$("$CARGO_TARGET_DIR/release/paligemma" devices)
echo "$devices"
vk_line=$(echo "$devices" | grep -E '^vulkan:0 ' || true)
if ! echo "$vk_line" | grep -qi llvmpipe; then
    echo "FAIL: vulkan:0 (llvmpipe) is not listed" >&2
    exit 1
fi
if [ "${vk_line##* }" != "ok" ]; then
    echo "FAIL: vulkan:0 computes the test matmul wrongly" >&2
    exit 1
fi

# 5. The parity tests on vulkan:0, printing their per-stage figures.
status=0
step "a. f32 shaders (GGML_VK_DISABLE_F16=1) on $PALIGEMMA_TEST_DEVICE, tolerance $TOL_F32"
t2=$(date +%s)
GGML_VK_DISABLE_F16=1 PALIGEMMA_TEST_TOL=$TOL_F32 \
    cargo test --release -p paligemma --features vulkan --test parity -- \
    --nocapture --test-threads=1 --exact f32_matches_reference_per_stage || status=1
t3=$(date +%s)
step "b. ggml's default shaders on $PALIGEMMA_TEST_DEVICE, tolerance $TOL"
# shellcheck disable=SC2086
PALIGEMMA_TEST_TOL=$TOL \
    cargo test --release -p paligemma --features vulkan --test parity -- \
    --nocapture --test-threads=1 $TESTS || status=1
t4=$(date +%s)

step "timing"
echo "build: $((t1 - t0)) s   tests: $((t3 - t2)) s (a) + $((t4 - t3)) s (b)   total: $((t4 - T_START)) s   ($(nproc) cores)"
if [ "$status" != 0 ]; then
    echo "FAIL: the parity tests failed on $PALIGEMMA_TEST_DEVICE" >&2
    exit 1
fi
echo "OK: the parity tests pass on $PALIGEMMA_TEST_DEVICE (lavapipe)"
