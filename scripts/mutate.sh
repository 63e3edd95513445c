#!/usr/bin/env bash
# A large mutation campaign: COUNT seeded mutants (default 2000) of the bundled demo
# model and of a converted fixture, each run through `paligemma run` in a child
# process; reports how many ran, were refused with an error, died of a signal,
# panicked or hung, and the peak memory of the children (GNU time, installed here
# when missing). The ordinary test suite runs the same test with 150 mutants each.
#
#   scripts/mutate.sh [COUNT]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x /usr/bin/time ] || { apt-get install -y -qq time >/dev/null 2>&1 || echo "GNU time not installed: no memory figures" >&2; }
PALIGEMMA_MUTANTS="${1:-2000}" cargo test --release -p paligemma-cli --test mutants -- --nocapture
