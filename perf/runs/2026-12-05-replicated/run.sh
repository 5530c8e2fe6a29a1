#!/usr/bin/env bash
# One A/B round: geobeat strict vs replicated, closed loop and open loop, same load.
set -euo pipefail
T=/work/tgt-cluster/release
mode=$1; tag=$2
D=/tmp/gb-perf/data-$tag; rm -rf $D
extra=()
if [ "$mode" = replicated ]; then extra=(--durability replicated --nats-url nats://127.0.0.1:4222,nats://127.0.0.2:4222,nats://127.0.0.3:4222); else extra=(--durability strict); fi
GEOBEAT_MQTT_LISTEN=off RUST_LOG=geobeat=warn $T/geobeat serve --init --data-dir $D --listen 127.0.0.1:18080 --shards 2 "${extra[@]}" > /tmp/gb-perf/server-$tag.log 2>&1 &
pid=$!
for i in $(seq 100); do curl -sf 127.0.0.1:18080/healthz >/dev/null && break; sleep 0.1; done
tok=$($T/geobeat token gateway "" --data-dir $D)
echo "== $mode closed"
$T/geobeat-load --url ws://127.0.0.1:18080/v1/ingest --gateway-token "$tok" --devices 1000 --mode closed --window 8 --duration 15 2>&1 | tail -12
echo "== $mode open 10000/s"
$T/geobeat-load --url ws://127.0.0.1:18080/v1/ingest --gateway-token "$tok" --devices 1000 --mode open --rate 10000 --duration 15 2>&1 | tail -12
if [ "$mode" = replicated ]; then ops=$($T/geobeat token ops --data-dir $D); curl -s -H "authorization: Bearer $ops" 127.0.0.1:18080/v1/stats | python3 -c 'import json,sys; r=json.load(sys.stdin)["replication"]; print("replication", json.dumps({k:r[k] for k in ("lag_bytes",)}), [(s["batches"],s["retries"],s["duplicates"]) for s in r["shards"]])'; fi
kill $pid; wait $pid || true
