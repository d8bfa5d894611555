#!/usr/bin/env bash
# The main job on a fresh machine: starts Kafka and PostgreSQL, then `weir demo` applies the
# topics and the sample workflow, starts a local HTTP receiver, runs the pipeline on sample events
# and shows the calls, rows and metrics.
#   bash scripts/demo.sh [--events N] [--tenants N]
set -euo pipefail
. "$(dirname "$0")/env.sh"
cargo run --release --quiet -- demo "$@"
