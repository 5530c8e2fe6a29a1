#!/usr/bin/env bash
# geobeat vs its ceiling (geobeat-null) vs what people use for this job today (Redis with
# appendfsync always and everysec, PostgreSQL with one transaction per heartbeat and batched,
# Mosquitto QoS 1 next to geobeat's own MQTT ingest), on this machine, with the same heartbeat
# stream from geobeat-load.
#
#   bash perf/compare.sh            full run for the record: 3 interleaved rounds of 10 s runs
#                                   (about 25 minutes); writes perf/runs/<date>-<host>/ and the
#                                   "## Comparison" section of perf/RESULTS.md
#   bash perf/compare.sh --quick    CI smoke run: small fleets, 2 s runs, every system once
#                                   (about a minute after the build); fails on any unclean run
#
# Any other flag goes to geobeat-compare (see `target/release/geobeat-compare --help`), e.g.
#   bash perf/compare.sh --rounds 1 --systems geobeat,null --workloads sat-1k-json
#   bash perf/compare.sh --systems geobeat-mqtt,mosquitto --workloads sat-1k-json,ref-10k-json \
#       --no-results-md           issue 16: geobeat over MQTT vs Mosquitto (about 5 minutes)
#
# Installs redis-server, postgresql and mosquitto from Debian's packages when missing (needs root
# or passwordless apt), builds the release binaries, and runs geobeat-compare, which starts each
# server on 127.0.0.1 with its own temporary data dir and stops it afterwards.
set -euo pipefail

cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    echo "compare.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The Debian packages start their own services where an init system runs; this script starts
# its own instances on free ports and leaves those alone.

cargo build --release --bin geobeat
cargo build --release -p geobeat-perf --features mint --bins
bin="${CARGO_TARGET_DIR:-target}/release"

exec "$bin/geobeat-compare" --repo . --bin-dir "$bin" "$@"
