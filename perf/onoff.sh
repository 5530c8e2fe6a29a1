#!/usr/bin/env bash
# Shared body of the "feature off vs on" server benchmarks (perf/audit_chain.sh,
# perf/device_seq.sh): the same closed-loop JSON load (device tokens, one connection per device)
# against a fresh release server per run, alternating OFF/ON for ROUNDS rounds. Prints per run
# the acked heartbeats/s, the server's CPU seconds (utime + stime from /proc, its helper threads
# included) per million acked heartbeats, and the 1-minute load average at the end of the run.
#
# Sourced, not run: the caller defines `server_args off|on` (extra `geobeat serve` words, one
# per line) and `url_query off|on` (a query string for the ingest URL, or nothing), then calls
# `onoff_main NAME`. Knobs: ROUNDS=3 DEVICES=1000 DURATION=15 WINDOW=8.
#
# Needs release builds: cargo build --release --bin geobeat
#                       cargo build --release -p geobeat-perf --features mint --bin geobeat-load
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin="${CARGO_TARGET_DIR:-target}/release"
rounds="${ROUNDS:-3}" devices="${DEVICES:-1000}" duration="${DURATION:-15}" window="${WINDOW:-8}"
work="$(mktemp -d /var/tmp/geobeat-onoff-bench.XXXXXX)"
pid=""
cleanup() {
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
cpu_s() { awk '{ print ($14 + $15) / 100 }' "/proc/$1/stat"; }

onoff_run() { # $1 = off|on
    local data="$work/data-$1-$RANDOM" port extra query
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    mapfile -t extra < <(server_args "$1")
    GEOBEAT_MQTT_LISTEN=off RUST_LOG=geobeat=warn "$bin/geobeat" serve --init --listen "127.0.0.1:$port" \
        --data-dir "$data" --shards 2 "${extra[@]}" >"$work/server.log" 2>&1 &
    pid=$!
    for _ in $(seq 200); do
        curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
        sleep 0.05
    done
    query="$(url_query "$1")"
    local url="ws://127.0.0.1:$port/v1/ingest${query:+?$query}"
    local before after
    before=$(cpu_s "$pid")
    "$bin/geobeat-load" --url "$url" --secret-file "$data/secret" --devices "$devices" \
        --mode closed --window "$window" --warmup 2 --duration "$duration" --drain 5 \
        --json-out "$work/$1.json" >"$work/load.out" 2>&1
    after=$(cpu_s "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
    python3 - "$work/$1.json" "$1" "$before" "$after" <<'EOF'
import json, os, sys
r = json.load(open(sys.argv[1]))
def find(d, key):
    if isinstance(d, dict):
        for k, v in d.items():
            if k == key:
                return v
            f = find(v, key)
            if f is not None:
                return f
    return None
rate = find(r, "throughput_acked_per_s")
acked = find(r, "acked_total") or find(r, "acked")
cpu = float(sys.argv[4]) - float(sys.argv[3])
print(f"{sys.argv[2]:>3}  {rate:10.0f} heartbeats/s  {cpu / max(acked, 1) * 1e6:6.2f} server CPU-s per M  (acked {acked}, server CPU {cpu:.1f} s, load average {os.getloadavg()[0]:.1f})")
EOF
    rm -rf "$data"
}

onoff_main() { # $1 = the benchmark's name
    echo "$1: $rounds rounds, $devices devices, window $window, ${duration}s, $(nproc) cores, $(uname -r)"
    for _ in $(seq "$rounds"); do
        onoff_run off
        onoff_run on
    done
}
