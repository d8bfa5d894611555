# Sourced by scripts/test.sh and scripts/demo.sh: installs missing build dependencies, starts (or
# finds) Kafka and PostgreSQL, and exports where they are. cargo's target directory lives outside
# the clone (like the Kafka jars), so a fresh clone on the same machine reuses the build.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${WEIR_CACHE:-$HOME/.cache/weir}/target}
bash scripts/setup.sh
bash scripts/kafka.sh up
DATABASE_URL=${DATABASE_URL:-$(bash scripts/postgres.sh up)}
export DATABASE_URL
