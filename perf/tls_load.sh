#!/usr/bin/env bash
# TLS on vs off with one load generator (perf/RESULTS.md "TLS on vs off with geobeat-load"):
# server CPU per heartbeat for WebSocket (ws:// vs wss://) and MQTT (mqtt:// vs mqtts://), open
# loop at RATE heartbeats/s over DEVICES device connections (one heartbeat per frame, strict
# durability), ROUNDS interleaved rounds (ws wss mqtt mqtts, then again), one server for all runs.
# The CPU is the server's utime+stime from /proc sampled inside the measured window only (after
# the connection ramp, so TLS handshakes are not counted; perf/tls.sh measures those), divided by
# the acked heartbeats/s geobeat-load reports. Also prints user memory per idle connection for
# ws:// and wss:// (IDLE=N: N device connections at 10 heartbeats/s in total, fresh server each).
# Needs release builds: cargo build --release --bin geobeat &&
#   cargo build --release -p geobeat-perf --features mint --bins
# QUICK=1: 200 devices at 1,000/s for 3 s, one round (smoke run, about 25 s; CI runs it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${CARGO_TARGET_DIR:-$root/target}/release
server=${GEOBEAT_BIN:-$bin/geobeat}
devices=${DEVICES:-1000}
rate=${RATE:-5000}
secs=${SECS:-10}
rounds=${ROUNDS:-3}
kinds=${KINDS:-ws wss mqtt mqtts}
idle=${IDLE:-0}
connect_rate=${CONNECT_RATE:-2000}
[ -n "${QUICK:-}" ] && { devices=200; rate=1000; secs=3; rounds=1; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
d=$(mktemp -d)
pid=
trap 'kill $pid 2>/dev/null || true; rm -rf "$d"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -keyout "$d/ca.key" \
  -out "$d/ca.pem" -subj "/CN=bench CA" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$d/ext"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/srv.key" -out "$d/srv.csr" \
  -subj "/CN=localhost" 2>/dev/null
openssl x509 -req -in "$d/srv.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial -days 30 \
  -extfile "$d/ext" -out "$d/srv.pem" 2>/dev/null
port=${PORT:-18410}
start() {
  rm -rf "$d/data"
  "$server" serve --init --data-dir "$d/data" --listen 127.0.0.1:$port \
    --mqtt-listen 127.0.0.1:$((port + 1)) --tls-listen 127.0.0.1:$((port + 2)) \
    --mqtts-listen 127.0.0.1:$((port + 3)) --tls-cert "$d/srv.pem" --tls-key "$d/srv.key" \
    --connections-max 12000 --log-level warn &
  pid=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:$port/healthz >/dev/null && break; sleep 0.1; done
}
stop() { kill $pid; wait $pid 2>/dev/null || true; pid=; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$pid/stat"; }
url() {
  case $1 in
    ws) echo "--target ws --url ws://127.0.0.1:$port/v1/ingest" ;;
    wss) echo "--target ws --url wss://localhost:$((port + 2))/v1/ingest --tls-ca $d/ca.pem" ;;
    mqtt) echo "--target mqtt --url mqtt://127.0.0.1:$((port + 1))" ;;
    mqtts) echo "--target mqtt --url mqtts://localhost:$((port + 3)) --tls-ca $d/ca.pem" ;;
  esac
}
tick=$(getconf CLK_TCK)
echo "== commit $(git -C "$root" rev-parse --short HEAD), $(date -u +%FT%TZ), $(nproc) cores," \
  "load $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$idle" -gt 0 ]; then
  echo "-- user memory per idle device connection, $idle connections (fresh server each)"
  for kind in ${IDLE_KINDS:-ws wss}; do
    start
    before=$(awk '/RssAnon/ {print $2}' /proc/$pid/status)
    # shellcheck disable=SC2046
    "$bin/geobeat-load" $(url $kind) --secret-file "$d/data/secret" --devices "$idle" \
      --mode open --rate 10 --duration 12 --warmup 1 --connect-rate $connect_rate \
      > "$d/idle.out" 2>&1 &
    lp=$!
    sleep $(( idle / connect_rate + 6 ))
    during=$(awk '/RssAnon/ {print $2}' /proc/$pid/status)
    wait $lp || { cat "$d/idle.out"; exit 1; }
    grep -iE "error|fail" "$d/idle.out" | head -3
    curl -s http://127.0.0.1:$port/metrics | grep "^geobeat_tls_events_total" || true
    echo "$kind: $(grep -E '^connections:' "$d/idle.out"); RssAnon $before -> $during kB:" \
      "$(( (during - before) * 1024 / idle )) B per connection"
    stop
  done
fi
[ "$rounds" -gt 0 ] || exit 0
start
warmup=2
ramp=$(awk -v n="$devices" -v r="$connect_rate" 'BEGIN { printf "%.1f", n / r }')
echo "-- server CPU per heartbeat, $devices devices, $rate/s, ${secs} s measured, $rounds rounds"
for round in $(seq "$rounds"); do
  for kind in $kinds; do
    # shellcheck disable=SC2046
    "$bin/geobeat-load" $(url $kind) --secret-file "$d/data/secret" --devices "$devices" \
      --mode open --rate "$rate" --duration "$secs" --warmup $warmup --connect-rate $connect_rate --fail-on-errors \
      > "$d/run.out" 2>&1 &
    lp=$!
    # Sample inside the measured window: after the ramp and warmup, 1 s short of its end.
    sleep "$(awk -v r="$ramp" -v w=$warmup 'BEGIN { print r + w + 1.5 }')"
    c0=$(cpu_ticks); t0=$(date +%s.%N)
    sleep $((secs - 2))
    c1=$(cpu_ticks); t1=$(date +%s.%N)
    wait $lp || { cat "$d/run.out"; exit 1; }
    tput=$(awk '/^throughput:/ { print $2 }' "$d/run.out")
    p50=$(sed -n 's/^ack latency: p50 \([0-9]*\) us.*/\1/p' "$d/run.out")
    p99=$(sed -n 's/^ack latency:.* p99 \([0-9]*\) us.*/\1/p' "$d/run.out")
    errs=$(grep -E '^errors:' "$d/run.out" | tr -s ' ')
    awk -v k=$kind -v r=$round -v c0=$c0 -v c1=$c1 -v t0=$t0 -v t1=$t1 -v hz=$tick -v tp=$tput \
      -v p50=$p50 -v p99=$p99 -v e="$errs" -v l="$(cut -d' ' -f1 /proc/loadavg)" 'BEGIN {
        cpu = (c1 - c0) / hz / (t1 - t0);
        printf "round %d %-6s %7.0f hb/s  server CPU %5.1f%%  %6.1f us/heartbeat  ack p50 %s us p99 %s us  load %s  %s\n",
          r, k, tp, cpu * 100, cpu / tp * 1e6, p50, p99, l, e }'
  done
done
curl -s http://127.0.0.1:$port/metrics | grep '^geobeat_tls_events_total' || true
stop
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
