#!/usr/bin/env bash
# Runs fuzz targets one after the other, each to RUNS executions (default 10 million), and
# appends one line per target to fuzz/campaign-summary.txt. FUZZING.md records the figures.
#
#   fuzz/campaign.sh address parse_adapter probe_file detector_checkpoint manifest feature_spec
#   fuzz/campaign.sh none nonfinite_never_contributes liar_within_bound
#
# The first argument is the sanitizer (`address` or `none`). The parser targets run under
# AddressSanitizer: their code includes the zero-copy views of untrusted bytes. The invariant
# targets check logic (who contributes, how far the global moves) and run without it, at about
# 7× the executions per second (ASan's allocator dominates their many small allocations).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
SAN=${1:?sanitizer: address or none}
shift
RUNS=${RUNS:-10000000}
cargo fuzz build -s "$SAN"
for target in "$@"; do
  mkdir -p "fuzz/corpus/$target"
  start=$(date +%s)
  rc=0
  cargo fuzz run -s "$SAN" "$target" "fuzz/corpus/$target" -- -runs="$RUNS" \
    -rss_limit_mb=4096 -malloc_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    >"fuzz/$target.log" 2>&1 || rc=$?
  echo "$target rc=$rc secs=$(($(date +%s) - start)) sanitizer=$SAN commit=$(git rev-parse --short HEAD)" \
    >>fuzz/campaign-summary.txt
done
