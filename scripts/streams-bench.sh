#!/usr/bin/env bash
# One engine for many cameras against the cameras served one after another, measured
# side by side: each round runs every setup once, in turn, for SECONDS, so that the
# machine's noise falls on all of them alike; the medians over the rounds and their
# ratios to the baseline come last.
#
#   scripts/streams-bench.sh [-m MODEL] [--image FILE] [--prompts 'a|b'] [--streams N]
#                            [--threads N] [--seconds S] [--rounds R] [--fps F] [-- BENCH ARGS]
#
# Setups (all at --fps, default 300: more than any of them can answer, so each runs
# at its capacity):
#   one camera      the baseline: one camera on all --threads (cameras served one after
#                   another by separate models can answer no more than this in total)
#   shared, 2 lanes N cameras on one engine, --threads split over two lanes
#   shared, 1 lane  N cameras on one engine, one batch at a time on all --threads
#   separate        N cameras, an engine each (default threads each)
#   alone on lanes  one camera on a 2-lane engine (a lane working alone takes every
#                   thread: this should match the baseline)
# Other `paligemma bench` arguments (e.g. --random pg2-3b-224 --type q4_0 instead of
# -m) follow `--`.
set -euo pipefail
cd "$(dirname "$0")/.."

model=models/demo/paligemma2-demo-f16.gguf
image=""
prompts="caption en|detect cat ; dog"
streams=4
threads=$(nproc)
seconds=10
rounds=3
fps=300
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        -m|--model) model=$2; shift 2 ;;
        --image) image=$2; shift 2 ;;
        --prompts) prompts=$2; shift 2 ;;
        --streams) streams=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --fps) fps=$2; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

bin=target/release/paligemma
[ -x "$bin" ] || cargo build --release -q -p paligemma-cli
source_args=(-m "$model")
if [ ${#extra[@]} -gt 0 ]; then
    for a in "${extra[@]}"; do [ "$a" = --random ] && source_args=(); done
fi
common=("${source_args[@]}" --seconds "$seconds" --fps "$fps" --stream-prompts "$prompts" --json "${extra[@]}")
[ -n "$image" ] && common+=(--image "$image")

names=("one camera, $threads threads" "$streams cameras, shared, 2 lanes" "$streams cameras, shared, 1 lane" "$streams cameras, separate engines" "one camera, 2 lanes")
setups=("--streams 1 --threads $threads" "--streams $streams --threads $threads --lanes 2" "--streams $streams --threads $threads" "--streams $streams --separate" "--streams 1 --threads $threads --lanes 2")

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "started $(date -u +%H:%M:%S) UTC: ${common[*]}" >&2
for r in $(seq 1 "$rounds"); do
    for i in "${!setups[@]}"; do
        # shellcheck disable=SC2086 # the setup's words are separate arguments
        "$bin" bench "${common[@]}" ${setups[$i]} >"$out/$i.$r.json" 2>/dev/null
        echo "round $r: ${names[$i]} done" >&2
    done
done
echo "ended $(date -u +%H:%M:%S) UTC" >&2

python3 - "$out" "$rounds" "${names[@]}" <<'EOF'
import json, statistics, sys
out, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rows = []
for i, name in enumerate(names):
    runs = [json.load(open(f"{out}/{i}.{r}.json")) for r in range(1, rounds + 1)]
    totals = [run["total_answers_per_s"] for run in runs]
    p90 = [max(s["p90_latency_ms"] for s in run["per_stream"]) / max(min(s["p90_latency_ms"] for s in run["per_stream"]), 1e-9) for run in runs]
    tokens = statistics.mean(s["mean_tokens"] for run in runs for s in run["per_stream"])
    rss = max(run["peak_rss_bytes"] or 0 for run in runs) / 1e9
    rows.append((name, totals, statistics.median(totals), max(p90), tokens, rss))
base = rows[0][2]
fmt = lambda x: f"{x:.1f}" if x >= 10 else f"{x:.3f}"
print(f"| setup | answers/s per round | median | vs one camera | worst p90 spread | tokens/answer | peak RSS |")
print(f"|---|---|---|---|---|---|---|")
for name, totals, median, spread, tokens, rss in rows:
    print(f"| {name} | {' / '.join(fmt(t) for t in totals)} | {fmt(median)} | {median / base:.2f}x | {spread:.2f}x | {tokens:.1f} | {rss:.2f} GB |")
EOF
