#!/usr/bin/env bash
# Log hash chain on vs off (issue 18 item 3): a fresh release server started with
# `--audit-chain off` and then `--audit-chain on` (the default: a helper thread per shard hashes
# the durable entries into `.chain` sidecars), alternating for ROUNDS rounds under the same
# closed-loop load; the measurement and its knobs are perf/onoff.sh's.
#
#   bash perf/audit_chain.sh           # ROUNDS=3 DEVICES=1000 DURATION=15 WINDOW=8
#
# Needs release builds: cargo build --release --bin geobeat
#                       cargo build --release -p geobeat-perf --features mint --bin geobeat-load
set -euo pipefail
server_args() { printf '%s\n' --audit-chain "$1"; }
url_query() { :; }
source "$(dirname "$0")/onoff.sh"
onoff_main audit_chain.sh
