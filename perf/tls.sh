#!/usr/bin/env bash
# TLS figures (perf/RESULTS.md "TLS"): server CPU per full handshake with an ECDSA P-256 and an
# RSA-2048 certificate (one executor, so "per core" is what one core does), user-space memory per
# idle wss:// device connection next to ws:// at CONNS connections, and server CPU per heartbeat
# over wss:// versus ws:// at RATE heartbeats/s. The clients are Python (perf/tls_bench.py:
# ssl + websockets); the figures are the server's own CPU time and RssAnon from /proc, so the
# clients' cost is not counted. Needs a release build: cargo build --release --bin geobeat.
# QUICK=1: a few seconds each (smoke run).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${GEOBEAT_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/geobeat}
conns=${CONNS:-3000}
rate=${RATE:-2000}
secs=10
[ -n "${QUICK:-}" ] && { conns=200; secs=2; rate=200; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
d=$(mktemp -d)
pid=
trap 'kill $pid 2>/dev/null || true; rm -rf "$d"' EXIT
cd "$d"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -keyout ca.key \
  -out ca.pem -subj "/CN=bench CA" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > ext
for kind in ecdsa rsa; do
  if [ $kind = ecdsa ]; then alg=(-newkey ec -pkeyopt ec_paramgen_curve:P-256); else alg=(-newkey rsa:2048); fi
  openssl req "${alg[@]}" -nodes -keyout $kind.key -out $kind.csr -subj "/CN=localhost" 2>/dev/null
  openssl x509 -req -in $kind.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -extfile ext \
    -out $kind.pem 2>/dev/null
done
port=${PORT:-18310}
tls=$((port + 1))
start() {
  "$bin" serve --init --data-dir "$d/data-$1" --shards 1 --listen 127.0.0.1:$port --mqtt-listen off \
    --tls-listen 127.0.0.1:$tls --tls-cert "$d/$1.pem" --tls-key "$d/$1.key" \
    --connections-max 12000 --log-level warn &
  pid=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:$port/healthz >/dev/null && break; sleep 0.1; done
}
stop() { kill $pid; wait $pid 2>/dev/null || true; }
bench=$root/perf/tls_bench.py
echo "== commit $(git -C "$root" rev-parse --short HEAD), $(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for kind in ecdsa rsa; do
  start $kind
  echo "-- handshakes, $kind"
  python3 "$bench" handshakes --pid $pid --port $tls --ca ca.pem --workers 2 --seconds $secs
  stop
done
echo "-- idle connections (a fresh server for each)"
start ecdsa
tok=$("$bin" token gateway "" --data-dir "$d/data-ecdsa")
python3 "$bench" idle --pid $pid --port $port --token "$tok" --conns $conns
stop
start ecdsa
python3 "$bench" idle --pid $pid --port $tls --ca ca.pem --token "$tok" --conns $conns
echo "-- CPU per heartbeat at $rate/s over 200 connections"
python3 "$bench" rate --pid $pid --port $port --token "$tok" --conns 200 --rate $rate --seconds $secs
python3 "$bench" rate --pid $pid --port $tls --ca ca.pem --token "$tok" --conns 200 --rate $rate --seconds $secs
curl -s http://127.0.0.1:$port/metrics | grep '^geobeat_tls_events_total' || true
stop
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
