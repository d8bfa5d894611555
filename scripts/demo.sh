#!/usr/bin/env bash
# The main job on a fresh machine: starts Kafka and PostgreSQL, then `weir demo` applies the
# topics and a sample workflow, starts a local HTTP receiver, runs the pipeline on sample events
# and shows the calls, rows and metrics.
#   bash scripts/demo.sh [--events N] [--tenants N]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
bash scripts/setup.sh
bash scripts/kafka.sh up
DATABASE_URL=${DATABASE_URL:-$(bash scripts/postgres.sh up)}
export DATABASE_URL
cargo run --release --quiet -- demo "$@"
