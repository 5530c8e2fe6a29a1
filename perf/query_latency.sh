#!/usr/bin/env bash
# Last-location and history query latency while ingest runs: geobeat-load drives 20,000
# heartbeats/s from 1,000 devices; one keep-alive HTTP client (examples/query_latency.rs) queries
# those devices round-robin. Needs: cargo build --release --workspace --features geobeat-perf/mint --examples
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release
port=${PORT:-18230}
d=$(mktemp -d)
"$bin/geobeat" serve --mqtt-listen off --init --data-dir "$d" --listen 127.0.0.1:$port --log-level warn &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$d"' EXIT
for _ in $(seq 100); do curl -sf http://127.0.0.1:$port/healthz >/dev/null && break; sleep 0.1; done
"$bin/geobeat-load" --url ws://127.0.0.1:$port/v1/ingest --secret-file "$d/secret" --devices 1000 \
  --mode open --rate 20000 --duration 22 --warmup 1 --connect-rate 5000 > "$d/load.out" 2>&1 &
lp=$!
sleep 5
ops=$("$bin/geobeat" token ops --data-dir "$d")
echo "last location: $("$bin/examples/query_latency" 127.0.0.1:$port "$ops" sim- 1000 8)"
echo "history (limit 100): $("$bin/examples/query_latency" 127.0.0.1:$port "$ops" sim- 1000 8 history)"
wait $lp
grep -E "throughput|ack latency" "$d/load.out"
