#!/usr/bin/env bash
# Installs what edgeflow's commands need on a fresh Debian machine, idempotently:
#   - a Rust toolchain (must already exist: rustup's cargo on PATH),
#   - Debian packages: prometheus (for `promtool check metrics` in the tests).
# Usage: scripts/setup.sh [run|test]   (what is installed depends on the purpose)
set -euo pipefail
purpose="${1:-test}"

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

case "$purpose" in
    run) ;;
    test)
        command -v promtool >/dev/null 2>&1 || apt_install prometheus
        command -v promtool >/dev/null 2>&1 || { log "promtool still missing after installing prometheus"; exit 1; }
        ;;
    *) log "unknown purpose '$purpose' (expected run or test)"; exit 2 ;;
esac
log "ready for: $purpose"
