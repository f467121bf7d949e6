#!/usr/bin/env bash
# Before/after figures for the move to rayon (issue 10, item 1), and its thread scaling.
#
#   (a) checks out the commit before the change (BEFORE, default 880f93f: scoped threads
#       per call) in a temporary git worktree;
#   (b) runs the aggregation, feature-extraction and probe-training benches on both trees,
#       interleaved ROUNDS times (default 3), and prints the median per bench and tree
#       and the after/before ratio;
#   (c) runs FedAvg, Krum, the coordinate median and feature extraction on this tree with
#       RAYON_NUM_THREADS=1 and =2 (twice each, interleaved) for the scaling figure.
#
# Both trees build into the same CARGO_TARGET_DIR. Time it on a quiet machine (the
# script takes the same lock as bench_side_by_side.sh).
#
#   scripts/bench_threads.sh                 # full run
#   QUICK=1 scripts/bench_threads.sh         # smoke test: tiny warm-up/measurement, one
#                                            # bench per step; the numbers mean nothing
#
# Environment: BEFORE (commit, default 880f93f), CARGO_TARGET_DIR (default ./target),
# CRITERION_HOME (default $CARGO_TARGET_DIR/criterion), QUICK.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BEFORE=${BEFORE:-880f93f}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export CRITERION_HOME=${CRITERION_HOME:-$CARGO_TARGET_DIR/criterion}
# One codegen unit for every crate of both trees: with the default 16, code
# layout alone moved Krum by up to 20 % between builds of identical kernels,
# which would be timed as a before/after difference (Cargo.toml sets the same
# for this crate; the environment makes the before tree match).
export CARGO_PROFILE_BENCH_CODEGEN_UNITS=1

if [[ -n "${QUICK:-}" ]]; then
  TIMES=(--warm-up-time 0.1 --measurement-time 0.2 --noplot)
  AGG='^n20_d3407872/fedavg$'
  FEAT='^extract_f32/first_layer_b$'
  PROBE=''
  SCALE_AGG='^n20_d3407872/fedavg$'
else
  TIMES=(--warm-up-time 1 --measurement-time 5 --noplot)
  AGG='^n20_d3407872/'
  FEAT='^extract_'
  PROBE='^probe_train_2000x40960/logistic-lbfgs$'
  SCALE_AGG='^n20_d3407872/(read_once|fedavg|krum|median)$'
fi

# Runs `cargo bench --bench $1 -- $2 <criterion args...>` in the current directory,
# keeping criterion's result lines (id, time, change) and dropping the rest.
bench() {
  local name=$1 filter=$2
  shift 2
  [[ -z "$filter" ]] && return 0
  cargo bench --quiet --bench "$name" -- "$filter" "${TIMES[@]}" "$@" 2>&1 |
    grep -vE '^(Gnuplot|Benchmarking|Warning|peak_alloc|Found|  [0-9]+ \(|$)' || true
}

exec 9>/tmp/safe-fedllm-bench.lock
flock 9
echo "== load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== CARGO_TARGET_DIR=$CARGO_TARGET_DIR CRITERION_HOME=$CRITERION_HOME"

# (a) the commit before the change, in a temporary worktree (removed on exit).
WT=$(mktemp -d /tmp/safe-fedllm-before.XXXXXX)
rmdir "$WT"
cleanup() { git -C "$ROOT" worktree remove --force "$WT" 2>/dev/null || true; }
trap cleanup EXIT
git -C "$ROOT" worktree add --detach "$WT" "$BEFORE" >/dev/null
echo "== before: $(git -C "$WT" log -1 --format='%h %s')"
echo "== after:  $(git log -1 --format='%h %s')"

# (b) before and after, interleaved ROUNDS times: this machine drifts by ~10 %
# over minutes, so a before-then-after sequence would time the drift. Each
# round runs both trees back to back; the summary gives the median over rounds
# of criterion's point estimate, per tree, and the after/before ratio.
ROUNDS=${ROUNDS:-3}
LOG=$(mktemp /tmp/safe-fedllm-bench-threads.XXXXXX)
for round in $(seq "$ROUNDS"); do
  for tree in before after; do
    dir=$ROOT
    [[ $tree == before ]] && dir=$WT
    echo "== round $round: $tree"
    (
      cd "$dir"
      bench aggregate "$AGG"
      bench features "$FEAT"
      bench probe "$PROBE"
    ) | sed "s/^/$tree\t/" | tee -a "$LOG"
  done
done

# (c) thread scaling of this tree (rayon's global pool, sized by RAYON_NUM_THREADS).
for threads in 1 2 1 2; do
  echo "== RAYON_NUM_THREADS=$threads"
  (
    RAYON_NUM_THREADS=$threads bench aggregate "$SCALE_AGG"
    RAYON_NUM_THREADS=$threads bench features "$FEAT"
  ) | sed "s/^/threads$threads\t/" | tee -a "$LOG"
done
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 "$ROOT/scripts/bench_threads_summary.py" "$LOG"
