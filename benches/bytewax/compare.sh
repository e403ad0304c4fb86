#!/usr/bin/env bash
# Side-by-side: edgeflow against Bytewax on one identical job (1,000,000 JSON heartbeats
# from one file, keyed by node, 10 s tumbling event-time windows, count and mean cpu),
# results checked for equality, throughputs reported as ratios.
#
# Usage: benches/bytewax/compare.sh [RECORDS]   (default 1000000)
# Installs Bytewax into the project's virtualenv (.venv) if needed.
set -euo pipefail
cd "$(dirname "$0")/../.."
records="${1:-1000000}"
work="${EDGEFLOW_BENCH_DIR:-/tmp/edgeflow-bytewax}"
mkdir -p "$work"

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c "import bytewax" 2>/dev/null || .venv/bin/pip install -q "bytewax==0.21.1"
cargo build --release --quiet -p edgeflow-engine
edgeflow=./target/release/edgeflow

input="$work/heartbeats-$records.jsonl"
if [ ! -s "$input" ]; then
    echo "generating $records heartbeats into $input" >&2
    minutes=$(( records / 2000 + 10 ))   # 1,000 nodes every 30 s = 2,000 a minute
    cat > "$work/generate.yaml" <<YAML
sources:
  fleet:
    type: generator
    nodes: 1000
    speed: max
    duration: ${minutes}m
    failure_rate: 0.001
    seed: 3
sinks:
  out:
    type: file
    input: fleet
    path: $work/all.jsonl
YAML
    "$edgeflow" run "$work/generate.yaml" --no-metrics --log-format json 2>/dev/null
    head -n "$records" "$work/all.jsonl" > "$input"
    rm "$work/all.jsonl"
fi

cat > "$work/edgeflow.yaml" <<YAML
sources:
  beats:
    type: file
    path: $input
    max_out_of_orderness: 5s
operators:
  windows:
    type: window_aggregate
    input: beats
    key: node_id
    field: cpu
    window: 10s
    aggregates: [count, mean]
sinks:
  out:
    type: file
    input: windows
    path: $work/edgeflow-out.jsonl
YAML

seconds() { local start end; start=$(date +%s.%N); "$@" >/dev/null 2>&1; end=$(date +%s.%N); echo "$end - $start" | awk '{ split($0, t, " - "); printf "%.3f", t[1] - t[2] }'; }

declare -A took
for workers in 1 2; do
    took["edgeflow $workers"]=$(seconds "$edgeflow" run "$work/edgeflow.yaml" --no-metrics --workers "$workers")
    cp "$work/edgeflow-out.jsonl" "$work/edgeflow-out-$workers.jsonl"
    rm -f "$work/bytewax-out.jsonl"
    took["bytewax $workers"]=$(EDGEFLOW_BENCH_INPUT="$input" EDGEFLOW_BENCH_OUTPUT="$work/bytewax-out.jsonl" \
        seconds .venv/bin/python -m bytewax.run -w "$workers" benches/bytewax/job:flow)
    cp "$work/bytewax-out.jsonl" "$work/bytewax-out-$workers.jsonl"
    .venv/bin/python benches/bytewax/check.py "$work/edgeflow-out-$workers.jsonl" "$work/bytewax-out-$workers.jsonl"
done

echo
echo "| job ($records heartbeats) | workers | seconds | heartbeats/s | edgeflow / Bytewax |"
echo "| --- | ---: | ---: | ---: | ---: |"
for workers in 1 2; do
    e=${took["edgeflow $workers"]}; b=${took["bytewax $workers"]}
    awk -v n="$records" -v w="$workers" -v e="$e" -v b="$b" 'BEGIN {
        printf "| Bytewax 0.21.1 | %d | %.2f | %.0f | |\n", w, b, n / b;
        printf "| edgeflow | %d | %.2f | %.0f | %.1fx |\n", w, e, n / e, b / e }'
done
