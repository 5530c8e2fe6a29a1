#!/usr/bin/env bash
# Issue 6 figures: what subscriptions and geofences cost ingest. Each run starts a fresh release
# server, optionally creates geofences over the HTTP API and opens subscribers (geobeat-subload),
# then drives ingest at saturation (geobeat-load, closed loop) and prints one table row:
#
#   base        no subscribers, no fences
#   subs-world  SUBS subscribers, each subscribed to the whole world (every heartbeat goes to
#               every subscriber: the fan-out ceiling; the bounded queues drop what a subscriber
#               cannot take, reported as missed)
#   subs-ids    SUBS subscribers, each following IDS random device ids of the fleet
#   fences      FENCES geofences (random circles and polygons in the band the fleet moves in),
#               no subscribers: the server skips enter/exit work while nobody subscribes a fence
#   fences-sub  the same fences and one subscriber to one fence: enter/exit against every fence
#               for every heartbeat, the ingest cost of the fences
#   fences-worst  the worst case the fence limits allow (issue 20 §5): FENCE_VERTICES_TOTAL_MAX /
#               FENCE_VERTICES_MAX = 100 combs of 10,000 positions (2,499 teeth each) overlapping
#               over the western half of the fleet's band, so every heartbeat there lands in a
#               boundary cell of all 100, and one subscriber to one of them
#
# Columns: heartbeats/s acked (geobeat-load's window), events/s delivered and missed/s summed
# over subscribers (geobeat-subload's window, which lies inside the load's), event lag p50/p99
# (server receive -> subscriber), and server CPU per acked heartbeat (utime+stime of the server
# over the whole load run, connect ramp and drain included, divided by every acked heartbeat;
# subscriber fan-out is part of it), and server CPU per delivered event (utime+stime sampled at
# the start and end of the subscriber window, divided by the events delivered in it: ingest of
# the window's heartbeats is part of it). Client CPU shares the machine: see each tool's report
# in the work directory (kept with KEEP=1). GEOBEAT_ENGINE=glommio|ring (the server reads it)
# picks the connection engine.
#
# Usage: bash perf/subscribe.sh [run ...]     (default: base subs-world subs-ids fences fences-sub)
# Settings (environment): DURATION (s, default 10; each run takes about DURATION + 8 s),
# DEVICES (1000), WINDOW (8), SUBS (1000), IDS (10), FENCES (10000), PORT (18240), KEEP.
# Fences are created with the bulk import (POST /v1/geofences, up to 10,000 per request, one
# persist per request; one PUT each would persist the whole set every time, minutes for 10,000).
# FENCES_FILE=path saves the created set there, and a later run with the same FENCES_FILE starts
# the server on a copy instead (the server loads <data-dir>/geofences.json at start).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
DURATION=${DURATION:-10}
DEVICES=${DEVICES:-1000}
WINDOW=${WINDOW:-8}
SUBS=${SUBS:-1000}
IDS=${IDS:-10}
FENCES=${FENCES:-10000}
port=${PORT:-18240}
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(base subs-world subs-ids fences fences-sub)

cargo build --release -q -p geobeat --bin geobeat
cargo build --release -q -p geobeat-perf --features mint --bin geobeat-load --bin geobeat-subload
bin="${CARGO_TARGET_DIR:-$root/target}/release"

work=$(mktemp -d /var/tmp/geobeat-subscribe-XXXXXX)
server_pid=""
sub_pid=""
cleanup() {
  [ -n "$sub_pid" ] && kill "$sub_pid" 2>/dev/null || true
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ -n "${KEEP:-}" ]; then echo "subscribe.sh: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
json() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, d))" "$1" "$2"; }

# Creates $2 fences on the server at 127.0.0.1:$port with ops token $1, 10,000 per bulk import
# request over one keep-alive connection; prints the rate.
create_fences() {
  python3 - "$port" "$1" "$2" "$KIND" <<'EOF'
import http.client, json, math, random, sys, time
port, token, n, kind = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
rng = random.Random(6)
BATCH = 10000  # FENCE_BULK_ENTRIES_MAX
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
started = time.time()
batch = []
def send(batch, first):
    payload = json.dumps({"fences": batch})
    conn.request("POST", "/v1/geofences", payload,
                 {"authorization": "Bearer " + token, "content-type": "application/json"})
    resp = conn.getresponse()
    text = resp.read()
    if resp.status != 200:
        sys.exit("subscribe.sh: POST /v1/geofences (fences from f%05d): %d %s" % (first, resp.status, text[:300]))
def comb(d):
    # 10,000 positions: a spine below lat -60 and 2,499 teeth up to lat 70 over lon -179..-1.
    teeth, x0, y0 = 2499, -179.0 + d, -60.0
    w = 178.0 / teeth
    ring = [[x0, y0 - 0.01]]
    for k in range(teeth):
        x = x0 + k * w
        ring += [[x, 70.0], [x + w / 2, 70.0], [x + w / 2, y0], [x + w, y0]]
    ring += [[x0 + 178.0, y0 - 0.01], ring[0]]
    return {"type": "Polygon", "coordinates": [ring]}
for i in range(n):
    if kind == "comb":
        batch.append({"name": "f%05d" % i, "shape": comb(i * 1e-6)})
        if len(batch) == BATCH or i == n - 1:
            send(batch, i + 1 - len(batch))
            batch = []
        continue
    # Same band as geobeat-load's tracks; sizes log-uniform from a yard to a city.
    lat, lon = rng.uniform(-60, 70), rng.uniform(-180, 180)
    if i % 2 == 0:
        body = {"center": [lon, lat], "radius_m": math.exp(rng.uniform(math.log(100), math.log(50000)))}
    else:
        r = math.exp(rng.uniform(math.log(0.001), math.log(0.5)))
        k = rng.randint(4, 12)
        r_lon = r / max(0.2, math.cos(math.radians(lat)))
        lon = max(-180 + r_lon, min(180 - r_lon, lon))  # polygons may not cross the antimeridian
        ring = [[lon + r_lon * math.cos(2 * math.pi * j / k), lat + r * math.sin(2 * math.pi * j / k)]
                for j in range(k)]
        ring.append(ring[0])
        body = {"type": "Polygon", "coordinates": [ring]}
    batch.append({"name": "f%05d" % i, "shape": body})
    if len(batch) == BATCH or i == n - 1:
        send(batch, i + 1 - len(batch))
        batch = []
elapsed = time.time() - started
print("created %d fences in %.1f s (%.0f/s)" % (n, elapsed, n / elapsed), file=sys.stderr)
EOF
}

# Starts the server on the data directory $1/data, logging to $1/server.log; waits until healthy.
start_server() {
  "$bin/geobeat" serve --mqtt-listen off --init --data-dir "$1/data" --listen "127.0.0.1:$port" --log-level warn >>"$1/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.05; done
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null || { echo "subscribe.sh: server did not start" >&2; cat "$1/server.log" >&2; exit 1; }
}

run() {
  local name=$1 subs=0 fences=0 sub_args=() win_pid=""
  KIND=random
  case $name in
    base) ;;
    subs-world) subs=$SUBS; sub_args=(--bbox=-180,-90,180,90) ;;
    subs-ids) subs=$SUBS; sub_args=(--device-ids "$IDS" --id-prefix sim- --id-space "$DEVICES") ;;
    fences) fences=$FENCES ;;
    # The fences with one subscriber to one of them: enter/exit is computed against every fence
    # for every heartbeat only while some fence subscription exists (without one, the server
    # skips the work), so this is the ingest cost of the fences themselves.
    fences-sub) fences=$FENCES; subs=1; sub_args=(--fence f00000) ;;
    fences-worst) fences=100; subs=1; sub_args=(--fence f00000); KIND=comb ;;
    *) echo "subscribe.sh: unknown run $name" >&2; exit 2 ;;
  esac
  local d="$work/$name"
  mkdir -p "$d"
  start_server "$d"
  local ops; ops=$("$bin/geobeat" token ops --data-dir "$d/data")
  if [ "$fences" -gt 0 ]; then
    if [ -n "${FENCES_FILE:-}" ] && [ -s "$FENCES_FILE" ]; then
      # A previous run's fences: the server loads <data-dir>/geofences.json at start.
      kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
      cp "$FENCES_FILE" "$d/data/geofences.json"
      start_server "$d"
      local loaded; loaded=$(curl -sf -H "Authorization: Bearer $ops" "http://127.0.0.1:$port/v1/geofences" \
        | python3 -c "import json,sys; print(len(json.load(sys.stdin)['fences']))")
      [ "$loaded" -eq "$fences" ] || { echo "subscribe.sh: $FENCES_FILE holds $loaded fences, not $fences" >&2; exit 1; }
      echo "loaded $loaded fences from $FENCES_FILE" >&2
    else
      create_fences "$ops" "$fences"
      if [ -n "${FENCES_FILE:-}" ]; then cp "$d/data/geofences.json" "$FENCES_FILE"; echo "saved the fences to $FENCES_FILE" >&2; fi
    fi
  fi
  if [ "$subs" -gt 0 ]; then
    # Its window starts 3.5 s in and ends 1 s before the load's (which starts ~1 s in, after
    # a 0.2 s ramp and 2 s of warmup), so it measures saturated ingest only.
    GEOBEAT_TOKEN=$ops "$bin/geobeat-subload" --url "ws://127.0.0.1:$port/v1/subscribe" \
      --subscribers "$subs" "${sub_args[@]}" --warmup 3.5 --duration "$((DURATION - 1))" \
      --json-out "$d/sub.json" >"$d/sub.out" 2>&1 &
    sub_pid=$!
    # Server CPU over the subscriber's window (its start and end, as above).
    (sleep 3.5; ticks "$server_pid" >"$d/win.ticks"; sleep "$((DURATION - 1))"; ticks "$server_pid" >>"$d/win.ticks") &
    win_pid=$!
  fi
  sleep 1
  local t0; t0=$(ticks "$server_pid")
  "$bin/geobeat-load" --url "ws://127.0.0.1:$port/v1/ingest" --secret-file "$d/data/secret" \
    --devices "$DEVICES" --mode closed --window "$WINDOW" --duration "$DURATION" --warmup 2 \
    --connect-rate 5000 --json-out "$d/load.json" >"$d/load.out" 2>&1
  local t1; t1=$(ticks "$server_pid")
  local hb acked cpu
  hb=$(json "$d/load.json" "round(throughput_acked_per_s)")
  acked=$(json "$d/load.json" "counters['acked_total']")
  cpu=$(python3 -c "print(round(($t1-$t0)/$(getconf CLK_TCK)*1e6/max(1,$acked), 2))")
  local ev="-" missed="-" lag="-" per_ev="-"
  if [ -n "$sub_pid" ]; then
    wait "$sub_pid" || { echo "subscribe.sh: geobeat-subload failed:" >&2; cat "$d/sub.out" >&2; exit 1; }
    sub_pid=""
    ev=$(json "$d/sub.json" "round(events_per_s)")
    missed=$(json "$d/sub.json" "round(missed_per_s)")
    lag=$(json "$d/sub.json" "'%.1f/%.1f' % (lag['p50_us']/1000, lag['p99_us']/1000)")
    wait "$win_pid"
    local events; events=$(json "$d/sub.json" "events")
    per_ev=$(python3 -c "t=[int(x) for x in open('$d/win.ticks').read().split()]; print(round((t[1]-t[0])/$(getconf CLK_TCK)*1e6/max(1,$events), 3))")
    local subscribed; subscribed=$(json "$d/sub.json" "subscribed")
    [ "$subscribed" -eq "$subs" ] || echo "subscribe.sh: warning: only $subscribed of $subs subscribed ($d/sub.out)" >&2
  fi
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
  printf '%-11s %6s %7s %13s %13s %11s %15s %14s %12s\n' "$name" "$subs" "$fences" "$hb" "$ev" "$missed" "$lag" "$cpu" "$per_ev"
}

echo "subscribe.sh: $DEVICES devices closed loop window $WINDOW, ${DURATION} s windows; $(nproc) cores; engine ${GEOBEAT_ENGINE:-glommio}; load average $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-11s %6s %7s %13s %13s %11s %15s %14s %12s\n' run subs fences heartbeats/s events/s missed/s "lag p50/p99 ms" "server us/hb" "us/event"
for r in "${runs[@]}"; do run "$r"; done
echo "subscribe.sh: load average after $(cut -d' ' -f1-3 /proc/loadavg)"
