#!/usr/bin/env bash
# The main job: a simulated 1,000-node edge fleet, its health computed live on 2 timely
# workers, status changes and region rollups printed, metrics on 127.0.0.1:9898.
# Extra arguments go to `edgeflow run` (e.g. --workers 4). Ctrl-C stops it gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh run
cargo build --release --quiet -p edgeflow-engine
exec ./target/release/edgeflow run pipelines/edge-fleet.yaml --workers "${EDGEFLOW_WORKERS:-2}" "$@"
