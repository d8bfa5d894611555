# Sourced by scripts/test.sh and scripts/demo.sh: installs missing build dependencies, starts (or
# finds) Kafka and PostgreSQL, and exports where they are. cargo's target directory lives outside
# the clone (like the Kafka jars), so a fresh clone on the same machine reuses the build.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${WEIR_CACHE:-$HOME/.cache/weir}/target}
bash scripts/setup.sh
bash scripts/kafka.sh up
DATABASE_URL=${DATABASE_URL:-$(bash scripts/postgres.sh up | tail -n 1)}
case "$DATABASE_URL" in
  postgres://* | postgresql://*) ;;
  *) echo "env.sh: scripts/postgres.sh did not print a postgres:// URL (got '$DATABASE_URL')" >&2; exit 1 ;;
esac
export DATABASE_URL
