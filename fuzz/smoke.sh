#!/usr/bin/env bash
# Runs every fuzz target for a bounded time on the stable toolchain and fails on any crash.
# Usage: fuzz/smoke.sh [SECONDS_PER_TARGET]   (default 60)
# Longer runs: fuzz/smoke.sh 3600, or one target:
#   cargo fuzz run -s none decode_amplification -- -max_total_time=3600 -rss_limit_mb=512 -malloc_limit_mb=64
# Every run is held to 512 MiB of RSS and 64 MiB per allocation, so a decoder that lets input
# amplify into memory is a crash, not a slow run.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
# `-s none`: no sanitizer, so the stable toolchain suffices (sanitizers need nightly flags).
# The committed seeds live in fuzz/corpus/<target>/seed-*; new inputs found are kept there too
# (ignored by git).
for target in $(cargo fuzz list); do
  mkdir -p "fuzz/corpus/$target"
  echo "== fuzzing $target for ${secs}s"
  log="$(mktemp)"
  if ! cargo fuzz run -s none "$target" "fuzz/corpus/$target" -- \
      -max_total_time="$secs" -max_len=4096 -rss_limit_mb=512 -malloc_limit_mb=64 \
      -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz target $target FAILED: see fuzz/artifacts/$target/ for the crashing input" >&2
    exit 1
  fi
  grep -E '^stat::number_of_executed_units|^Done [0-9]+ runs' "$log" || tail -n 3 "$log"
  rm -f "$log"
done
echo "fuzz smoke: all targets ran with zero crashes"
