#!/usr/bin/env bash
# Runs every geobeat fuzz target for a bounded time, after replaying the committed crash inputs
# of bugs already fixed (artifacts-fixed/<target>/*) as regression tests. Exits non-zero if any
# target finds a crash (the input is left in fuzz/artifacts/<target>/) or a fixed input crashes
# again.
#
#   fuzz/run-ci.sh [SECONDS_PER_TARGET] [TARGET...]      default: 30 seconds, every target
#
# Works on stable Rust: targets are built with `--sanitizer none` (libFuzzer's coverage
# instrumentation needs no nightly flag). Set GEOBEAT_FUZZ_SANITIZER=address to build with
# AddressSanitizer instead; on a stable toolchain that also needs RUSTC_BOOTSTRAP=1, which this
# script then sets. Needs `cargo install cargo-fuzz` and a C++ compiler (libFuzzer is C++).
set -euo pipefail

cd "$(dirname "$0")"
secs="${1:-30}"
shift || true
all=(proto_json proto_binary ws_frames http_parse auth_verify log_recovery)
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi
sanitizer="${GEOBEAT_FUZZ_SANITIZER:-none}"
# Each sanitizer builds into its own target directory, so switching does not rebuild the other.
target_dir=target
if [ "$sanitizer" != "none" ]; then
  export RUSTC_BOOTSTRAP=1
  target_dir="target-$sanitizer"
fi

max_len() {
  case "$1" in
    log_recovery) echo 20000 ;;   # room for a few thousand structured entries
    ws_frames) echo 8192 ;;       # several frames per input
    http_parse) echo 9000 ;;      # past HTTP_HEAD_BYTES_MAX
    *) echo 4096 ;;
  esac
}

command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install cargo-fuzz" >&2; exit 2; }
cargo fuzz build -s "$sanitizer" --target-dir "$target_dir"

failed=()
summary=()
for t in "${targets[@]}"; do
  bin="$target_dir/x86_64-unknown-linux-gnu/release/$t"
  # Regression: every input that once crashed this target must now pass.
  if compgen -G "artifacts-fixed/$t/*" >/dev/null; then
    if ! "$bin" artifacts-fixed/"$t"/* >"$target_dir/fuzz-$t-regress.log" 2>&1; then
      echo "== $t: a fixed crash input crashes again (see fuzz/$target_dir/fuzz-$t-regress.log)" >&2
      failed+=("$t(regression)")
    fi
  fi
  mkdir -p "corpus-ci/$t" "artifacts/$t"
  args=(-max_total_time="$secs" -max_len="$(max_len "$t")" -print_final_stats=1)
  if [ -f "dict/$t.dict" ]; then args+=(-dict="dict/$t.dict"); fi
  log="$target_dir/fuzz-$t.log"
  if cargo fuzz run -s "$sanitizer" --target-dir "$target_dir" "$t" "corpus-ci/$t" "corpus/$t" -- "${args[@]}" >"$log" 2>&1; then
    status=ok
  else
    status=CRASH
    failed+=("$t")
    echo "== $t crashed; input in fuzz/artifacts/$t/; log fuzz/$log:" >&2
    grep -v '^#' "$log" | tail -40 >&2
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo "?")
  summary+=("$(printf '%-14s %-6s %12s execs  cov %s' "$t" "$status" "$execs" "$cov")")
done

echo "fuzz: ${secs}s per target, sanitizer $sanitizer"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
