#!/usr/bin/env bash
# Every aggregation rule beside Flower (numpy) and torch (CPU) on the same round,
# the defended round beside Flower's undefended `aggregate`, and the n = 100
# streamed BF16 round beside torch and Flower holding it in memory — one run,
# back to back, under one lock. Needs a venv with numpy, flwr==1.42.0, torch and
# safetensors: PY=/path/to/venv/bin/python scripts/bench_side_by_side.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
exec 9>/tmp/safe-fedllm-bench.lock
flock 9
echo "== load before: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo bench --bench aggregate --no-run 2>/dev/null
cargo bench --bench detect --no-run 2>/dev/null
cargo build --release --example streamed_round 2>/dev/null
echo "== ours: aggregators, n = 20, d = 3,407,872 (criterion medians)"
cargo bench --bench aggregate -- n20_d3407872 --warm-up-time 1 --measurement-time 5 --noplot 2>&1 \
  | grep -E "^n20_d3407872/|time:" | paste - - | sed -E 's/ +/ /g'
echo "== Flower 1.42 (numpy)"
"$PY" scripts/bench_aggregate_flower.py --skip-bulyan
echo "== torch (CPU, 2 threads)"
"$PY" scripts/bench_aggregate_torch.py --threads 2
echo "== ours: defended round (admission + probe + client level + gate + FedAvg), n = 20"
cargo bench --bench detect -- detect_round --warm-up-time 1 --measurement-time 5 --noplot 2>&1 \
  | grep -E "time:|one round" | sed -E 's/ +/ /g'
echo "== ours: streamed round, n = 100 BF16 uploads from mmap'd files"
./target/release/examples/streamed_round --n 100 >/dev/null   # writes the files once
for i in 1 2 3; do ./target/release/examples/streamed_round --n 100; done
echo "== peers holding the same n = 100 round in memory"
"$PY" scripts/bench_streamed_round_peers.py --n 100
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)"
