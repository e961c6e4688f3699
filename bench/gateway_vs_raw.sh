#!/usr/bin/env bash
# The gateway against plain DataFusion on the same Parquet files (issue 7): generates the demo
# world at the given size once (target/bench-gateway-PEOPLE), runs the fixed query set four ways,
# the small query at 1/8/32 clients and 64 concurrent heavy queries, and writes the report into
# docs/benchmarks.md between the gateway_vs_raw markers. Run it on a quiet machine.
#   bench/gateway_vs_raw.sh [PEOPLE] [RUNS]     (defaults 1000000 10)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench gateway_vs_raw -- "${1:-1000000}" "${2:-10}"
