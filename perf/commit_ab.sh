#!/usr/bin/env bash
# A/B of geobeat's commit paths (issue 15 §3): `--write-mode mmap` (write into a shared mapping,
# then fdatasync), `pwrite` (stage the group, one pwrite, then fdatasync) and `dsync` (stage the
# group, one io_uring write on an O_DSYNC descriptor, no fdatasync), each with the adaptive group
# commit off and on (`--commit-linger-adaptive-us`). The same release binary throughout, the
# variant selected by GEOBEAT_WRITE_MODE / GEOBEAT_COMMIT_LINGER_ADAPTIVE_US in the server's
# environment (geobeat-compare starts it with `--durability strict`, one shard per core, and
# passes its environment on). Interleaved: each round runs every variant once, in the same order
# (A B C ... A B C ...), so load drift on a shared machine hits every side alike. Reuses
# geobeat-compare (perf/compare.sh) for the servers, the load generator and the measurements.
#
#   bash perf/commit_ab.sh                    3 rounds × 6 variants of sat-1k-json, light-1k-json
#   ROUNDS=1 DURATION=5 bash perf/commit_ab.sh
#   MODES=mmap,dsync LINGERS=0,200 WORKLOADS=light-1k-json bash perf/commit_ab.sh
#
# Prints one line per run (round, workload, variant, heartbeats/s, server CPU-s per million
# heartbeats, ack p50/p99 in µs, load generator CPU-s per million, load average before the run),
# then the medians per workload and variant, and writes every run's results and the summary
# under $OUT (default perf/runs/<date>-commit-ab). Nothing here is hard-coded: every figure is
# read from geobeat-compare's raw.csv of that run.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
duration=${DURATION:-10}
workloads=${WORKLOADS:-sat-1k-json,light-1k-json}
modes=${MODES:-mmap,pwrite,dsync}
lingers=${LINGERS:-0,300}
out=${OUT:-perf/runs/$(date -u +%F)-commit-ab}
bin="${CARGO_TARGET_DIR:-target}/release"
# The commit the binaries are built from (-dirty: with uncommitted changes), taken before the
# build.
commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD 2>/dev/null || commit="$commit-dirty"
cargo build --release --bin geobeat
cargo build --release -p geobeat-perf --features mint --bins
mkdir -p "$out"
: > "$out/summary.tsv"
{
  echo "commit: $commit"
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(uname -n) $(uname -r), $(nproc) cores"
  echo "rounds=$rounds duration=$duration workloads=$workloads modes=$modes lingers=$lingers"
} > "$out/README.txt"
IFS=, read -r -a mode_list <<< "$modes"
IFS=, read -r -a linger_list <<< "$lingers"
for r in $(seq "$rounds"); do
  for mode in "${mode_list[@]}"; do
    for linger in "${linger_list[@]}"; do
      variant="$mode-adaptive$linger"
      dir="$out/$variant-$r"
      rm -rf "$dir"
      GEOBEAT_WRITE_MODE=$mode GEOBEAT_COMMIT_LINGER_ADAPTIVE_US=$linger \
        "$bin/geobeat-compare" --repo . --bin-dir "$bin" --rounds 1 \
        --duration "$duration" --systems geobeat --workloads "$workloads" --no-results-md \
        --out "$dir" > "$dir.log" 2>&1 || echo "run $variant-$r failed (see $dir.log)"
      [ -f "$dir/raw.csv" ] || continue
      # Columns are looked up by their names in raw.csv's header.
      awk -F, -v v="$variant" -v r="$r" '
        NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
        $col["system"] == "geobeat" {
          printf "%s\t%s\t%s\t%.0f\t%.2f\t%d\t%d\t%.2f\t%s\t%s\n", r, $col["workload"], v,
            $col["throughput_per_s"], $col["server_cpu_s_per_million"], $col["p50_us"],
            $col["p99_us"], $col["client_cpu_s_per_million"], $col["loadavg_before"],
            $col["problems"]
        }' "$dir/raw.csv" | tee -a "$out/summary.tsv"
    done
  done
done
header="round	workload	variant	hb/s	server_cpu_s/M	p50_us	p99_us	load_cpu_s/M	loadavg	problems"
{
  echo "$header"
  sort -t$'\t' -k2,2 -k3,3 -k1,1n "$out/summary.tsv"
  echo
  echo "medians over rounds:"
  echo "workload	variant	runs	hb/s	server_cpu_s/M	p50_us	p99_us"
  sort -t$'\t' -k2,2 -k3,3 "$out/summary.tsv" | awk -F'\t' '
    function median(list, n,    a, i, j, t) {
      split(list, a, " ")
      for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function flush() {
      if (key != "") printf "%s\t%d\t%.0f\t%.2f\t%.0f\t%.0f\n", key, n, median(hbs, n),
        median(cpu, n), median(p50, n), median(p99, n)
    }
    { k = $2 "\t" $3
      if (k != key) { flush(); key = k; n = 0; hbs = cpu = p50 = p99 = "" }
      n++; hbs = hbs " " $4; cpu = cpu " " $5; p50 = p50 " " $6; p99 = p99 " " $7 }
    END { flush() }'
} | tee "$out/summary.txt"
