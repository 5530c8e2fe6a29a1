#!/usr/bin/env bash
# Open-loop latency sweep: geobeat vs the null server (the ceiling) over 10,000 connections at
# several fixed total rates, pairs interleaved (null, geobeat, null, geobeat ...) so both see the
# same machine. It shows where the reference-rate latency targets of issue 3 can hold on this
# machine and where CPU saturation (server + load generator on the same cores) takes over.
#
#   bash perf/latency_sweep.sh                      # full: rates 2000 10000 20000 33334, 2 rounds
#   bash perf/latency_sweep.sh --rounds 3 --rates "2000 33334" --out DIR
#   bash perf/latency_sweep.sh --quick              # CI: 200 devices, 2 s runs, two small rates
#
# Per run it records ack latency from the INTENDED send time (no coordinated omission), the
# service time (actual send to ack: the server's and the network's share, without the load
# generator's own pacing delay), the send lag, and server and client CPU per heartbeat (server:
# utime+stime of the server process over the whole load run divided by every acked heartbeat).
# Writes DIR/raw.jsonl (one object per run) and DIR/summary.md (medians per rate and system, and
# the geobeat/null ratios the issue's targets are stated in).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=2
rates="2000 10000 20000 33334"
devices=10000
duration=10
warmup=2
drain=5
connect_rate=4000
out=""
quick=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --rounds) rounds="$2"; shift ;;
        --rates) rates="$2"; shift ;;
        --devices) devices="$2"; shift ;;
        --duration) duration="$2"; shift ;;
        --out) out="$2"; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "latency_sweep.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$quick" = 1 ]; then
    rounds=1; rates="500 2000"; devices=200; duration=2; warmup=1; drain=3
fi
case "$rounds" in ''|*[!0-9]*|0) echo "latency_sweep.sh: --rounds must be a positive integer, got '$rounds'" >&2; exit 2 ;; esac
for r in $rates; do
    case "$r" in ''|*[!0-9]*|0) echo "latency_sweep.sh: every rate must be a positive integer, got '$r'" >&2; exit 2 ;; esac
done

cargo build --release --bin geobeat
cargo build --release -p geobeat-perf --features mint --bins
bin="${CARGO_TARGET_DIR:-target}/release"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -z "$out" ]; then
    if [ "$quick" = 1 ]; then out="$(mktemp -d /tmp/geobeat-sweep.XXXXXX)"; else out="perf/runs/$(date -u +%Y-%m-%d)-sweep"; fi
fi
mkdir -p "$out"
: >"$out/raw.jsonl"
work="$(mktemp -d /var/tmp/geobeat-sweep.XXXXXX)"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_port() { # port path ("" = accepting TCP is enough: the null server answers only upgrades)
    for _ in $(seq 300); do
        if { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null; then
            if [ -z "$2" ]; then exec 3<&-; return 0; fi
            printf 'GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' "$2" >&3
            if head -c 12 <&3 | grep -q 'HTTP/1.1'; then exec 3<&-; return 0; fi
            exec 3<&-
        fi
        sleep 0.1
    done
    echo "latency_sweep.sh: server on port $1 did not answer" >&2
    return 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run_one() { # round rate system
    local round="$1" rate="$2" system="$3" port data log json t0 t1
    port="$(free_port)"
    data="$work/$system-$rate-$round"
    log="$out/$system-$rate-r$round"
    mkdir -p "$data"
    if [ "$system" = geobeat ]; then
        "$bin/geobeat" serve --mqtt-listen off --init --listen "127.0.0.1:$port" --data-dir "$data" >"$log.server.log" 2>&1 &
        server_pid=$!
        wait_port "$port" /readyz
    else
        # A secret for minting device tokens (`geobeat token` never creates one; the null
        # server ignores tokens anyway).
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$data/secret")
        "$bin/geobeat-null" --listen "127.0.0.1:$port" >"$log.server.log" 2>&1 &
        server_pid=$!
        wait_port "$port" ""
    fi
    json="$log.json"
    t0="$(cpu_ticks "$server_pid")"
    "$bin/geobeat-load" --url "ws://127.0.0.1:$port/v1/ingest" --secret-file "$data/secret" \
        --devices "$devices" --mode open --rate "$rate" --format json \
        --connect-rate "$connect_rate" --warmup "$warmup" --duration "$duration" --drain "$drain" \
        --json-out "$json" >"$log.load.txt" 2>&1 || true
    t1="$(cpu_ticks "$server_pid")"
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
    rm -rf "$data"
    python3 - "$json" "$round" "$rate" "$system" "$t0" "$t1" "$(getconf CLK_TCK)" >>"$out/raw.jsonl" <<'PY'
import json, sys
path, rnd, rate, system, t0, t1, hz = sys.argv[1:]
try:
    s = json.load(open(path))
except (OSError, ValueError) as e:
    print(json.dumps({"round": int(rnd), "rate": int(rate), "system": system, "ok": False, "error": str(e)}))
    sys.exit(0)
c = s["counters"]
acked = max(c["acked_total"], 1)
server_cpu_s = (int(t1) - int(t0)) / int(hz)
client_cpu_s = s["client_cpu"]["user_s"] + s["client_cpu"]["sys_s"]
print(json.dumps({
    "round": int(rnd), "rate": int(rate), "system": system,
    "ok": c["unacked"] == 0 and c["acked"] > 0 and c["disconnects"] == 0 and c["connect_failures"] == 0,
    "throughput_per_s": s["throughput_acked_per_s"],
    "p50_us": s["latency"]["p50_us"], "p99_us": s["latency"]["p99_us"], "p999_us": s["latency"]["p999_us"],
    "service_p50_us": s.get("service", {}).get("p50_us", 0), "service_p99_us": s.get("service", {}).get("p99_us", 0),
    "send_lag_p50_us": s.get("send_lag", {}).get("p50_us", 0),
    "server_us_per_hb": server_cpu_s * 1e6 / acked, "client_us_per_hb": client_cpu_s * 1e6 / acked,
}))
PY
    tail -n 1 "$out/raw.jsonl" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("latency_sweep.sh: round %s rate %s %-7s p50 %s us p99 %s us service p50 %s us server %.1f us/hb ok=%s" % (r["round"], r["rate"], r["system"], r.get("p50_us"), r.get("p99_us"), r.get("service_p50_us"), r.get("server_us_per_hb", 0), r["ok"]))'
}

for round in $(seq "$rounds"); do
    for rate in $rates; do
        for system in null geobeat; do
            run_one "$round" "$rate" "$system"
        done
    done
done

python3 - "$out/raw.jsonl" "$commit" "$devices" "$duration" "$rounds" >"$out/summary.md" <<'PY'
import json, statistics, sys, os, platform, time
path, commit, devices, duration, rounds = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
def med(rs, k):
    v = [r[k] for r in rs if k in r]
    return statistics.median(v) if v else float("nan")
rates = sorted({r["rate"] for r in rows})
print(f"# Open-loop latency sweep, geobeat vs null ({int(devices):,} connections, JSON)")
print()
print(f"commit `{commit}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
      f"Linux {platform.release()}; {rounds} round(s) of {duration} s per rate and system, medians; "
      "load generator on the same cores. Latency is from the intended send time; service is from "
      "the actual send (without the load generator's own pacing delay).")
print()
print("| rate/s | system | hb/s | p50 ms | p99 ms | p99.9 ms | service p50 ms | service p99 ms | send lag p50 ms | server µs/hb | client µs/hb | clean |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
ratios = []
for rate in rates:
    per = {}
    for system in ("null", "geobeat"):
        rs = [r for r in rows if r["rate"] == rate and r["system"] == system and "p50_us" in r]
        if not rs:
            continue
        per[system] = {k: med(rs, k) for k in ("throughput_per_s", "p50_us", "p99_us", "p999_us", "service_p50_us",
                                              "service_p99_us", "send_lag_p50_us", "server_us_per_hb", "client_us_per_hb")}
        m = per[system]
        clean = sum(1 for r in rs if r["ok"])
        print(f"| {rate:,} | {system} | {m['throughput_per_s']:,.0f} | {m['p50_us']/1e3:.2f} | {m['p99_us']/1e3:.2f} | "
              f"{m['p999_us']/1e3:.2f} | {m['service_p50_us']/1e3:.2f} | {m['service_p99_us']/1e3:.2f} | "
              f"{m['send_lag_p50_us']/1e3:.2f} | {m['server_us_per_hb']:.1f} | {m['client_us_per_hb']:.1f} | {clean}/{len(rs)} |")
    if "null" in per and "geobeat" in per:
        g, n = per["geobeat"], per["null"]
        ratios.append((rate, g["p50_us"] / max(n["p50_us"], 1), g["p99_us"] / max(n["p99_us"], 1),
                       g["server_us_per_hb"] / max(n["server_us_per_hb"], 1e-9)))
print()
print("| rate/s | geobeat/null p50 | geobeat/null p99 | geobeat/null server CPU per hb |")
print("|---:|---:|---:|---:|")
for rate, p50, p99, cpu in ratios:
    print(f"| {rate:,} | {p50:.2f}× | {p99:.2f}× | {cpu:.2f}× |")
PY
cat "$out/summary.md"
echo "latency_sweep.sh: results in $out"
if [ "$quick" = 1 ]; then
    # CI: every run must have completed cleanly; the numbers themselves are not judged.
    python3 -c 'import json,sys; rows=[json.loads(l) for l in open(sys.argv[1])]; bad=[r for r in rows if not r.get("ok")]; sys.exit("latency_sweep.sh: unclean runs: %s" % bad if bad or not rows else 0)' "$out/raw.jsonl"
    rm -rf "$out"
fi
