#!/usr/bin/env bash
# Runs every test against a real Kafka broker and PostgreSQL, starting both if needed:
#   bash scripts/test.sh [extra cargo test args]
set -euo pipefail
. "$(dirname "$0")/env.sh"
cargo test --all-targets "$@"
