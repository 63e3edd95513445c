#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ for MINUTES each (default 10), one after the
# other, and prints executions per second and in total for each.
#
#   scripts/fuzz.sh [MINUTES] [TARGET...]     targets: gguf checkpoint npz frame prompts output ros2 http
#
# Needs the nightly toolchain (installed on these machines) and cargo-fuzz, which it
# installs when missing. New inputs that grow coverage go to fuzz/new-corpus/<target>
# (merge the useful ones into fuzz/corpus/<target>); a crash is saved under
# fuzz/artifacts/<target>/ and must become a regression input in
# fuzz/regressions/<target>/ once fixed (the stable test suite replays both).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-10}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf checkpoint npz frame prompts output ros2 http)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
summary=()
status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/new-corpus/$t" "fuzz/artifacts/$t"
    log="fuzz/artifacts/$t.log"
    # -rss_limit_mb: an input that makes a parser hold more than this is a finding too.
    if ! cargo +nightly fuzz run --release "$t" "fuzz/new-corpus/$t" "fuzz/corpus/$t" -- \
        -max_total_time=$((minutes * 60)) -rss_limit_mb=2048 -timeout=30 -max_len=65536 \
        -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 >"$log" 2>&1; then
        status=1
        echo "$t: CRASH, see $log and fuzz/artifacts/$t/" >&2
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
    summary+=("$t: ${execs:-?} executions, ${rate:-?} per second, ${minutes} min")
done
printf '%s\n' "${summary[@]}"
exit "$status"
