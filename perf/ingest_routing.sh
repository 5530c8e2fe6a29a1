#!/usr/bin/env bash
# Device connections handed to their shard's executor (--routing migrate) versus kept where
# accepted with per-frame forwarding (--routing forward): saturation throughput, latency and
# server CPU per heartbeat, interleaved A B A B. Needs release builds (see ingest_idle_memory.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release
port=${PORT:-18200}
run() {
  local routing=$1; shift
  local d; d=$(mktemp -d)
  "$bin/geobeat" serve --mqtt-listen off --init --data-dir "$d" --listen 127.0.0.1:$port --log-level warn --routing "$routing" &
  local pid=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:$port/healthz >/dev/null && break; sleep 0.1; done
  "$bin/geobeat-load" --url ws://127.0.0.1:$port/v1/ingest --secret-file "$d/secret" "$@" --json-out "$d/out.json" \
    2>&1 | grep -E "throughput|ack latency"
  local ticks; ticks=$(awk '{print $14+$15}' /proc/$pid/stat)
  local acked; acked=$(python3 -c "import json;print(json.load(open('$d/out.json'))['counters']['acked_total'])")
  echo "$routing: server CPU $(python3 -c "print(round($ticks*10000/$acked, 2))") us per acked heartbeat ($acked acked)"
  kill $pid; wait $pid 2>/dev/null || true; rm -rf "$d"
}
uptime
for r in migrate forward migrate forward; do
  run $r --devices 1000 --mode closed --window 8 --duration 8 --warmup 2 --connect-rate 5000
done
