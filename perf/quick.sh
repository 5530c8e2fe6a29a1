#!/usr/bin/env bash
# Smoke benchmark for CI: build geobeat and geobeat-perf in release, start geobeat-null on a free loopback
# port, run geobeat-load against it for a few seconds in closed loop (JSON) and open loop
# (binary) with 100 devices, and fail unless both runs acked heartbeats with no errors.
# Takes well under 60 s after the build. Prints both reports.
set -euo pipefail

cd "$(dirname "$0")/.."
# The same two builds as latency_sweep.sh, compare.sh and tls_load.sh (same packages, same
# features), so CI compiles the release binaries once for all of them.
cargo build --release --bin geobeat
cargo build --release -p geobeat-perf --features mint --bins
bin="${CARGO_TARGET_DIR:-target}/release"

work="$(mktemp -d)"
null_pid=""
cleanup() {
    if [[ -n "$null_pid" ]]; then
        kill "$null_pid" 2>/dev/null || true
        wait "$null_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

"$bin/geobeat-null" --listen 127.0.0.1:0 --shards 1 --no-pin >"$work/null.out" 2>"$work/null.err" &
null_pid=$!
addr=""
for _ in $(seq 100); do
    addr="$(awk '/listening on/ { print $4; exit }' "$work/null.out")"
    [[ -n "$addr" ]] && break
    if ! kill -0 "$null_pid" 2>/dev/null; then break; fi
    sleep 0.1
done
if [[ -z "$addr" ]]; then
    echo "quick.sh: geobeat-null did not start" >&2
    cat "$work/null.err" >&2
    exit 1
fi
echo "quick.sh: geobeat-null on $addr"

common=(--url "ws://$addr/v1/ingest" --gateway-token quick --devices 100 --threads 1
    --warmup 1 --duration 3 --drain 5 --fail-on-errors)

echo "quick.sh: closed loop, JSON, window 8"
timeout 60 "$bin/geobeat-load" "${common[@]}" --mode closed --window 8 --format json

echo "quick.sh: open loop, binary, 2000 heartbeats/s in batches of 4"
timeout 60 "$bin/geobeat-load" "${common[@]}" --mode open --rate 2000 --format binary --batch 4

if ! kill -0 "$null_pid" 2>/dev/null; then
    echo "quick.sh: geobeat-null died during the runs" >&2
    cat "$work/null.err" >&2
    exit 1
fi
echo "quick.sh: ok"
