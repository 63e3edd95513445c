#!/usr/bin/env bash
# The whole workspace cross-built for aarch64 (the Jetson's CPU) and its tests run under
# qemu-user, in a Debian unstable chroot.
#
# - Makes the chroot with debootstrap (target/sid-arm64): Debian's Rust with the arm64
#   standard library, the aarch64 cross compilers, arm64 GStreamer and its base/good
#   plugins, qemu-user; later runs reuse it. Nothing comes from anywhere but Debian's
#   archive and crates.io (fetched here, then built offline inside).
# - Builds ggml with scripts/cross/aarch64-linux-gnu.cmake for GGML_CPU_ARM_ARCH
#   (default armv8.2-a+dotprod+fp16: the Orin's Cortex-A78AE) and our Rust code with the
#   same features, into target/aarch64.
# - Registers qemu-aarch64 with binfmt_misc for the run (tests start the CLI, the node
#   and GStreamer's plugin scanner as child processes; cargo's runner covers only the test
#   executables), then runs `cargo test --workspace --release` with qemu-aarch64 as
#   cargo's runner and QEMU_CPU (default cortex-a78ae, the Orin's own core).
# - Prints the test summary, the parity figures per type, `file` and sizes of the
#   binaries, and what `paligemma devices` says of the ARM CPU under emulation.
#
# Needs root (debootstrap, chroot, mounts, binfmt_misc). Usage: scripts/arm64-check.sh
# [extra cargo test arguments, e.g. -p paligemma --test parity]. Environment:
# GGML_CPU_ARM_ARCH and RUST_FEATURES (the CPU, see docs/jetson.md), QEMU_CPU,
# ARM64_TARGET_DIR (default target/aarch64), CHROOT, DEBIAN_MIRROR.
set -euo pipefail
# Bind mounts in a private mount namespace go with the script, even when it is killed.
if [ -z "${PALIGEMMA_PRIVATE_MOUNTS:-}" ]; then
    exec unshare --mount --propagation private env PALIGEMMA_PRIVATE_MOUNTS=1 "$0" "$@"
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CHROOT=${CHROOT:-$ROOT/target/sid-arm64}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
OUT=${ARM64_TARGET_DIR:-$ROOT/target/aarch64}
TARGET=aarch64-unknown-linux-gnu
export QEMU_CPU=${QEMU_CPU:-cortex-a78ae}
export GGML_CPU_ARM_ARCH=${GGML_CPU_ARM_ARCH:-armv8.2-a+dotprod+fp16}
RUST_FEATURES=${RUST_FEATURES:-+v8.2a,+dotprod,+fp16,+rcpc}
PACKAGES="rustc cargo libstd-rust-dev:arm64 gcc-aarch64-linux-gnu g++-aarch64-linux-gnu
    libc6-dev:arm64 libclang-dev clang cmake make pkg-config ca-certificates file qemu-user
    libgstreamer1.0-dev:arm64 libgstreamer-plugins-base1.0-dev:arm64
    gstreamer1.0-plugins-base:arm64 gstreamer1.0-plugins-good:arm64 time"
start=$(date +%s)

if [ ! -e "$CHROOT/.paligemma-ready" ]; then
    echo "== Debian unstable chroot in $CHROOT"
    command -v debootstrap >/dev/null || { apt-get update -qq; apt-get install -y -qq debootstrap >/dev/null; }
    [ -x "$CHROOT/usr/bin/apt-get" ] || debootstrap --variant=minbase sid "$CHROOT" "$MIRROR" >/dev/null
    cp /etc/resolv.conf "$CHROOT/etc/resolv.conf"
    # The archive's Release file may be past its Valid-Until on a mirror that lags.
    echo 'Acquire::Check-Valid-Until "false";' >"$CHROOT/etc/apt/apt.conf.d/99paligemma"
    chroot "$CHROOT" dpkg --add-architecture arm64
    chroot "$CHROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
        bash -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $(echo $PACKAGES) >/dev/null"
    touch "$CHROOT/.paligemma-ready"
fi
echo "== $(chroot "$CHROOT" rustc --version), $(chroot "$CHROOT" aarch64-linux-gnu-gcc --version | head -1), $(chroot "$CHROOT" qemu-aarch64 --version | head -1)"

# Child processes that are aarch64 executables (the CLI, the node, gst-plugin-scanner) go
# to qemu through binfmt_misc. "F" opens the interpreter now, so it runs inside the chroot.
BINFMT=/proc/sys/fs/binfmt_misc
[ -e "$BINFMT/register" ] || mount -t binfmt_misc binfmt_misc "$BINFMT"
AARCH64_MAGIC='7f454c460201010000000000000000000200b700'
if ! grep -lqs "magic $AARCH64_MAGIC" "$BINFMT"/*; then
    printf '%s' ':paligemma-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$CHROOT/usr/bin/qemu-aarch64"':F' >"$BINFMT/register"
    trap 'echo -1 >"$BINFMT/paligemma-aarch64"' EXIT
fi

# The repository, cargo's registry, /proc and /dev at the same paths inside.
for dir in "$ROOT" "$CARGO_HOME" /dev; do
    mkdir -p "$CHROOT$dir"
    mount --bind "$dir" "$CHROOT$dir"
done
mount -t proc proc "$CHROOT/proc"

inside() {
    local triple=${TARGET//-/_}
    chroot "$CHROOT" /usr/bin/env -i HOME=/root PATH=/usr/bin:/bin CARGO_HOME="$CARGO_HOME" \
        CARGO_TARGET_DIR="$OUT" QEMU_CPU="$QEMU_CPU" GGML_CPU_ARM_ARCH="$GGML_CPU_ARM_ARCH" \
        "CC_$triple=aarch64-linux-gnu-gcc" "CXX_$triple=aarch64-linux-gnu-g++" "AR_$triple=aarch64-linux-gnu-ar" \
        "CMAKE_TOOLCHAIN_FILE_$triple=$ROOT/scripts/cross/aarch64-linux-gnu.cmake" \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64 \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=$RUST_FEATURES" \
        PKG_CONFIG_ALLOW_CROSS=1 PKG_CONFIG_LIBDIR=/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig \
        PALIGEMMA_EMULATED=qemu \
        bash -c "cd '$ROOT' && $1"
}

mkdir -p "$OUT"
(cd "$ROOT" && cargo fetch --locked -q)
echo "== build for $TARGET (ggml: -march=$GGML_CPU_ARM_ARCH; Rust: $RUST_FEATURES)"
inside "cargo build --offline --release --target $TARGET --workspace --all-targets" >"$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log"; exit 1; }
echo "== built in $(($(date +%s) - start)) s; binaries:"
BIN=$OUT/$TARGET/release
for f in "$BIN/paligemma" "$BIN/paligemma-node" "$BIN/libgstpaligemma.so"; do
    chroot "$CHROOT" file -b "$f" | sed "s|^|  $(basename "$f"): |"
    echo "  $(basename "$f"): $(du -k "$f" | cut -f1) KiB, $(chroot "$CHROOT" aarch64-linux-gnu-strip -o /tmp/stripped "$f" && du -k "$CHROOT/tmp/stripped" | cut -f1) KiB stripped"
done
echo "== paligemma devices under qemu-aarch64 -cpu $QEMU_CPU"
inside "qemu-aarch64 '$BIN/paligemma' devices"

echo "== cargo test ${*:---workspace} --release under qemu-aarch64 -cpu $QEMU_CPU"
tests_start=$(date +%s)
set +e
SELECTION=${*:---workspace}
inside "cargo test --offline --release --target $TARGET --no-fail-fast $SELECTION -- --nocapture" >"$OUT/test.log" 2>&1
status=$?
set -e
grep -E "^test result:|^     Running|FAILED|panicked" "$OUT/test.log" || true
echo "== parity figures on aarch64 ($QEMU_CPU)"
grep -E "cache: vision|prefix logits cosine|matrices repacked" "$OUT/test.log" || true
passed=$(grep -Eo "test result: [a-zA-Z]+\. [0-9]+ passed; [0-9]+ failed" "$OUT/test.log" | awk '{p+=$4; f+=$6} END {print p+0, f+0}')
echo "== tests ran in $(($(date +%s) - tests_start)) s; whole run $(($(date +%s) - start)) s; log: $OUT/test.log"
echo "aarch64: ${passed% *} passed, ${passed#* } failed"
exit "$status"
