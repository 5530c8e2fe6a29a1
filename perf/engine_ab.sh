#!/usr/bin/env bash
# A/B of geobeat's two connection engines (issue 15 §2): `--engine glommio` (a reader and a
# writer task per connection) against `--engine ring` (one io_uring engine per executor), the
# same release binary, selected by GEOBEAT_ENGINE in the servers' environment. Interleaved: each
# round runs geobeat-compare once per engine (glommio then ring; the floor beside each), so load
# drift on a shared machine hits both sides alike.
#
#   bash perf/engine_ab.sh                 3 rounds of sat-1k-json, ref-10k-json, light-1k-json
#   ROUNDS=1 DURATION=5 bash perf/engine_ab.sh
#
# Prints one line per run (engine, workload, heartbeats/s, server CPU-s per million, ack p50/p99,
# load average) and writes each run's results under $OUT (default perf/runs/<date>-engine-ab).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
duration=${DURATION:-10}
workloads=${WORKLOADS:-sat-1k-json,ref-10k-json,light-1k-json}
systems=${SYSTEMS:-geobeat,floor}
out=${OUT:-perf/runs/$(date -u +%F)-engine-ab}
bin="${CARGO_TARGET_DIR:-target}/release"
cargo build --release --bin geobeat
cargo build --release -p geobeat-perf --features mint --bins
mkdir -p "$out"
for r in $(seq "$rounds"); do
  for engine in glommio ring; do
    dir="$out/$engine-$r"
    rm -rf "$dir"
    GEOBEAT_ENGINE=$engine "$bin/geobeat-compare" --repo . --bin-dir "$bin" --rounds 1 \
      --duration "$duration" --systems "$systems" --workloads "$workloads" --no-results-md \
      --out "$dir" > "$dir.log" 2>&1 || echo "run $engine-$r failed (see $dir.log)"
    [ -f "$dir/raw.csv" ] || continue
    # round, workload, system, hb/s, server CPU-s per M, p50 µs, p99 µs, and two more columns
    # of raw.csv (see its header: the server RSS peak and the run's wall seconds in this version)
    awk -F, -v e="$engine" -v r="$r" 'NR > 1 {
      sys = $3 == "geobeat" ? "geobeat-" e : $3;
      printf "%s\t%s\t%s\t%.0f\t%.2f\t%d\t%d\t%s\t%s\n", r, $2, sys, $6, $18, $11, $13, $21, $28
    }' "$dir/raw.csv" | tee -a "$out/summary.tsv"
  done
done
echo "round	workload	system	hb/s	cpu-s/M	p50_us	p99_us	rss_peak	wall_s"
sort -t$'\t' -k2,2 -k3,3 -k1,1n "$out/summary.tsv"
