#!/usr/bin/env bash
# PostgreSQL for development, tests and the demo, from Debian's packages.
#
#   scripts/postgres.sh up     install (when missing), start the cluster, create role and database
#                              `weir`, print the connection URL on stdout
#   scripts/postgres.sh down   stop the cluster
#
# If DATABASE_URL is set, weir is pointed at a database you run yourself: `up` only checks that it
# answers and prints it.
set -euo pipefail

say() { printf 'postgres: %s\n' "$*" >&2; }
url_default="postgres://weir:weir@127.0.0.1:5432/weir"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
as_postgres() { as_root runuser -u postgres -- "$@"; }

cluster() {
  # First cluster listed by pg_lsclusters: "<version> <name> <port> <status> ..."
  pg_lsclusters --no-header 2>/dev/null | awk 'NR==1 {print $1, $2, $4}'
}

up() {
  if [ -n "${DATABASE_URL:-}" ]; then
    psql "$DATABASE_URL" -qtAc 'select 1' >/dev/null || { say "DATABASE_URL does not answer"; exit 1; }
    say "using your database"; url="$DATABASE_URL"; return 0
  fi
  if ! command -v pg_lsclusters >/dev/null || [ -z "$(cluster)" ]; then
    say "installing PostgreSQL from Debian's packages"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
  fi
  read -r version name status <<<"$(cluster)"
  if [ "$status" != online ]; then
    say "starting cluster $version/$name"
    as_root pg_ctlcluster "$version" "$name" start
  fi
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
  pg_isready -q -h 127.0.0.1 || { say "cluster did not accept connections within 30 s"; exit 1; }
  as_postgres psql -qtAc "select 1 from pg_roles where rolname='weir'" | grep -q 1 \
    || as_postgres psql -qc "create role weir login password 'weir' createdb"
  as_postgres psql -qtAc "select 1 from pg_database where datname='weir'" | grep -q 1 \
    || as_postgres psql -qc "create database weir owner weir"
  say "serving at $url_default"
  url="$url_default"
}

down() {
  read -r version name status <<<"$(cluster)"
  [ "${status:-}" = online ] && as_root pg_ctlcluster "$version" "$name" stop && say "stopped" || say "not running"
}

case "${1:-}" in
  # Only the URL goes to stdout, since callers capture it; whatever apt, pg_ctlcluster and psql
  # print goes to stderr.
  up) up >&2; echo "$url" ;;
  down|stop) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
