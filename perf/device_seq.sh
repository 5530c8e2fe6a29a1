#!/usr/bin/env bash
# Device-scoped sequences on vs off (issue 18): the same closed-loop load against a fresh
# release server, once with `?epoch=0` on every connection (every heartbeat deduplicated and
# stored with its 16-byte device-sequence trailer) and once without, alternating for ROUNDS
# rounds; the measurement and its knobs are perf/onoff.sh's.
#
#   bash perf/device_seq.sh            # ROUNDS=3 DEVICES=1000 DURATION=15 WINDOW=8
#
# Needs release builds: cargo build --release --bin geobeat
#                       cargo build --release -p geobeat-perf --features mint --bin geobeat-load
set -euo pipefail
server_args() { :; }
url_query() { [[ "$1" == on ]] && echo "epoch=0" || true; }
source "$(dirname "$0")/onoff.sh"
onoff_main device_seq.sh
