#!/usr/bin/env bash
# Runs every test against a real Kafka broker and PostgreSQL, starting both if needed:
#   bash scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
bash scripts/setup.sh
bash scripts/kafka.sh up
DATABASE_URL=${DATABASE_URL:-$(bash scripts/postgres.sh up)}
export DATABASE_URL
cargo test --all-targets "$@"
