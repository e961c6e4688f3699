#!/usr/bin/env bash
# Runs the coverage-guided fuzz targets over the parse -> policy -> plan path for a bounded
# time each, from a seed corpus made anew from the tests and docs (fuzz/seeds.py).
#
#   fuzz/run.sh [SECONDS] [TARGET ...]     default: 60 seconds, targets plan_sql and plan
#
# cargo-fuzz drives libFuzzer; on this stable toolchain it needs RUSTC_BOOTSTRAP=1 (libFuzzer's
# -Z flags), and runs without a sanitizer (none is needed to catch panics, aborts and stack
# overflows, which are what the targets look for). A crash stops the run with a non-zero exit,
# and its input is kept in fuzz/artifacts/TARGET/ to replay with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none -O TARGET fuzz/artifacts/TARGET/crash-…
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(plan_sql plan)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
python3 seeds.py
for target in "${targets[@]}"; do
    echo "== fuzz $target for ${seconds}s"
    cargo fuzz run --sanitizer none -O "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -max_len=1100000 \
        -print_final_stats=1
done
