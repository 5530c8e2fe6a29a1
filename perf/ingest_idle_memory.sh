#!/usr/bin/env bash
# Server user-space memory per idle device connection: anonymous RSS of `geobeat serve` before
# and while 10,000 device connections (geobeat-load, open loop at 10 heartbeats/s in total, i.e.
# idle) are open. Needs release builds: cargo build --release --workspace --features geobeat-perf/mint
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${CARGO_TARGET_DIR:-$root/target}/release
port=${PORT:-18210}
devices=${DEVICES:-10000}
d=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$d"' EXIT
"$bin/geobeat" serve --mqtt-listen off --init --data-dir "$d" --listen 127.0.0.1:$port --log-level warn --connections-max 12000 &
pid=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:$port/healthz >/dev/null && break; sleep 0.1; done
before=$(awk '/RssAnon/ {print $2}' /proc/$pid/status)
"$bin/geobeat-load" --url ws://127.0.0.1:$port/v1/ingest --secret-file "$d/secret" --devices "$devices" \
  --mode open --rate 10 --duration 12 --warmup 1 --connect-rate 4000 > "$d/load.out" 2>&1 &
lp=$!
sleep 9
during=$(awk '/RssAnon/ {print $2}' /proc/$pid/status)
wait $lp
grep -E "connections:" "$d/load.out"
echo "server RssAnon: ${before} kB before, ${during} kB with ${devices} idle connections"
echo "per idle connection: $(( (during - before) * 1024 / devices )) bytes"
