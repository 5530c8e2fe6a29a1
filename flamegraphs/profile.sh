#!/usr/bin/env bash
# Flamegraphs of geobeat under load. For each workload: start a fresh `geobeat serve` (strict
# durability, defaults) on a free loopback port, drive it with geobeat-load, and while the
# measured window runs sample the server with
#     perf record -e cpu-clock -F 499 --call-graph dwarf -p <geobeat pid>
# then fold the stacks with inferno-collapse-perf and draw them with inferno-flamegraph into
# flamegraphs/geobeat-<workload>.svg. Also writes flamegraphs/geobeat-<workload>.top.txt (the
# hottest functions by self time, from `perf report`) and flamegraphs/README.md (workload,
# commit and exact commands of every SVG).
#
#   bash flamegraphs/profile.sh                 # both workloads
#   bash flamegraphs/profile.sh sat-1k-json     # one: sat-1k-json | ref-10k-json | sat-1k-bin
#
# GEOBEAT_PROFILE_KEEP=DIR keeps the folded stacks (folded-<workload>.txt) in DIR for analysis.
#
# Needs root (perf on another process) and installs linux-perf (apt) and inferno (cargo
# install) when missing. Each workload takes about half a minute plus perf's post-processing.
set -euo pipefail

cd "$(dirname "$0")/.."
out="flamegraphs"
profile_s=10
frequency_hz=499

workloads=("$@")
[ ${#workloads[@]} -gt 0 ] || workloads=(sat-1k-json ref-10k-json)

if ! command -v perf >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-perf
fi
if ! command -v inferno-flamegraph >/dev/null 2>&1; then
    cargo install --locked inferno
fi
export PATH="$HOME/.cargo/bin:$PATH"

cargo build --release --bin geobeat
cargo build --release -p geobeat-perf --features mint --bins
bin="${CARGO_TARGET_DIR:-target}/release"
commit="$(git rev-parse --short HEAD)"
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then commit="$commit-dirty"; fi

work="$(mktemp -d /var/tmp/geobeat-profile.XXXXXX)"
server_pid=""
load_pid=""
cleanup() {
    [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null || true
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_ready() { # port
    for _ in $(seq 300); do
        if { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null; then
            printf 'GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
            if head -c 12 <&3 | grep -q 'HTTP/1.1 200'; then exec 3<&-; return 0; fi
            exec 3<&-
        fi
        sleep 0.1
    done
    echo "profile.sh: geobeat did not become ready" >&2
    return 1
}

readme="$out/README.md"
{
    echo "# Flamegraphs"
    echo
    echo "Written by \`bash flamegraphs/profile.sh\` (do not edit by hand). Each SVG is one"
    echo "\`perf record -e cpu-clock -F $frequency_hz --call-graph dwarf\` of the \`geobeat serve\` process"
    echo "(all its threads, io_uring workers included) for ${profile_s} s inside the measured window"
    echo "of a load run, folded with \`inferno-collapse-perf\` and drawn with \`inferno-flamegraph\`."
    echo "The \`.top.txt\` beside each SVG lists the hottest functions by self time."
    echo "Machine: $(nproc) cores, $(uname -r); the load generator runs on the same cores."
    echo
} >"$readme"

for workload in "${workloads[@]}"; do
    case "$workload" in
        sat-1k-json) shape=(--devices 1000 --mode closed --window 8 --format json) ; ramp_s=1 ;;
        sat-1k-bin) shape=(--devices 1000 --mode closed --window 8 --format binary) ; ramp_s=1 ;;
        ref-10k-json) shape=(--devices 10000 --mode open --rate 33334 --format json) ; ramp_s=3 ;;
        *) echo "profile.sh: unknown workload $workload" >&2; exit 2 ;;
    esac
    port="$(free_port)"
    data="$work/data-$workload"
    server_cmd=("$bin/geobeat" serve --mqtt-listen off --listen "127.0.0.1:$port" --data-dir "$data")
    "${server_cmd[@]}" >"$work/server-$workload.log" 2>&1 &
    server_pid=$!
    wait_ready "$port"
    warmup_s=2
    duration_s=$((profile_s + 4))
    load_cmd=("$bin/geobeat-load" --url "ws://127.0.0.1:$port/v1/ingest" --secret-file "$data/secret"
        "${shape[@]}" --connect-rate 4000 --warmup "$warmup_s" --duration "$duration_s" --drain 10)
    "${load_cmd[@]}" >"$work/load-$workload.txt" 2>&1 &
    load_pid=$!
    # Start sampling 2 s into the measured window and stop 2 s before its end.
    sleep $((ramp_s + warmup_s + 2))
    perf_data="$work/perf-$workload.data"
    perf_cmd=(perf record -e cpu-clock -F "$frequency_hz" --call-graph dwarf -p "$server_pid" -o "$perf_data" -- sleep "$profile_s")
    echo "profile.sh: $workload: ${perf_cmd[*]}"
    "${perf_cmd[@]}" 2>"$work/perf-record-$workload.log"
    wait "$load_pid"
    load_pid=""
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
    server_pid=""

    svg="$out/geobeat-$workload.svg"
    top="$out/geobeat-$workload.top.txt"
    perf script -i "$perf_data" 2>/dev/null | inferno-collapse-perf >"$work/folded-$workload.txt"
    inferno-flamegraph --title "geobeat serve, $workload, commit $commit" \
        <"$work/folded-$workload.txt" >"$svg"
    if [ -n "${GEOBEAT_PROFILE_KEEP:-}" ]; then
        mkdir -p "$GEOBEAT_PROFILE_KEEP"
        cp "$work/folded-$workload.txt" "$GEOBEAT_PROFILE_KEEP/"
    fi
    {
        echo "# geobeat serve, $workload, commit $commit"
        echo
        echo "## Share of all samples by concern (inclusive: a sample counts for every concern on its stack)"
        python3 flamegraphs/concerns.py <"$work/folded-$workload.txt"
        echo
        echo "## Functions by self time (perf report --no-children --sort symbol)"
        perf report -i "$perf_data" --no-children --sort symbol --stdio -g none --percent-limit 0.7 2>/dev/null |
            grep -v '^#' | grep -v '^$' | sed -E 's/[[:space:]]+$//; s/[[:space:]]+-[[:space:]]+-$//'
        echo
        echo "## By thread"
        perf report -i "$perf_data" --no-children --sort comm --stdio -g none 2>/dev/null |
            grep -v '^#' | grep -v '^$' | sed -E 's/[[:space:]]+$//'
    } >"$top"
    summary="$(grep -E '^(throughput|ack latency|client cpu)' "$work/load-$workload.txt" | sed 's/^/    /')"
    {
        echo "## geobeat-$workload.svg"
        echo
        echo "- workload: $workload (\`${shape[*]}\`)"
        echo "- commit: \`$commit\`, profiled $(date -u '+%Y-%m-%d %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "- server: \`geobeat serve --listen 127.0.0.1:PORT --data-dir DIR\` (defaults: strict durability, one shard per core)"
        echo "- load: \`geobeat-load --url ws://127.0.0.1:PORT/v1/ingest --secret-file DIR/secret ${shape[*]} --connect-rate 4000 --warmup $warmup_s --duration $duration_s --drain 10\`"
        echo "- profile: \`${perf_cmd[*]/$perf_data/perf.data}\` (PID = the server), then"
        echo "  \`perf script | inferno-collapse-perf | inferno-flamegraph\`"
        echo "- the load run reported:"
        echo
        echo "$summary"
        echo
        echo "- hottest functions: [geobeat-$workload.top.txt](geobeat-$workload.top.txt)"
        echo
    } >>"$readme"
    echo "profile.sh: wrote $svg and $top"
done
