#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster in a temporary folder, unix socket only.
#
#   scripts/pg.sh start        start one; prints its libpq conninfo on stdout
#                              (last line), e.g.
#                              host=/tmp/es-pg.AbC123 port=5432 dbname=eventsourcing_test user=postgres
#   scripts/pg.sh url  DIR     print the conninfo of the cluster in DIR
#   scripts/pg.sh stop DIR     stop it and remove DIR (DIR may also be the
#                              conninfo printed by start; default $ES_PG_DIR)
#
# Settings: ES_PG_FSYNC=on for realistic durability (benchmarks; default off),
# ES_PG_OPTS="-c key=value ..." extra server options, ES_PG_BIN (binaries),
# ES_PG_PORT (socket name, default 5432), ES_PG_DB (database name).
# As root the server runs as the `postgres` user; otherwise as yourself.
set -euo pipefail

PGBIN=${ES_PG_BIN:-/usr/lib/postgresql/15/bin}
PORT=${ES_PG_PORT:-5432}
DB=${ES_PG_DB:-eventsourcing_test}

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

conninfo() { echo "host=$1 port=$PORT dbname=$DB user=postgres"; }

# Accept a folder or a conninfo string containing host=FOLDER.
resolve_dir() {
  local arg=${1:-${ES_PG_DIR:-}}
  [ -n "$arg" ] || { echo "pg.sh: which cluster? pass its folder or conninfo" >&2; exit 2; }
  if [[ $arg == *host=* ]]; then arg=${arg#*host=}; arg=${arg%% *}; fi
  printf '%s\n' "$arg"
}

start() {
  [ -x "$PGBIN/initdb" ] || { echo "pg.sh: $PGBIN/initdb not found (install postgresql-15; scripts/deps.sh)" >&2; exit 1; }
  local dir
  # /tmp, not $TMPDIR: the postgres user must reach it, and a unix socket
  # path must stay short.
  dir=$(mktemp -d "${ES_PG_TMP:-/tmp}/es-pg.XXXXXX")
  chmod 755 "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"
  local durab
  if [ "${ES_PG_FSYNC:-off}" = on ]; then
    durab="-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
  else
    durab="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  fi
  if ! as_owner "$PGBIN/initdb" -D "$dir/data" --auth=trust -U postgres \
        -E UTF8 --locale=C.UTF-8 --no-sync >"$dir/initdb.log" 2>&1; then
    cat "$dir/initdb.log" >&2; rm -rf "$dir"; exit 1
  fi
  # shellcheck disable=SC2086
  if ! as_owner "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
        -o "-c listen_addresses='' -c unix_socket_directories='$dir' -p $PORT \
            -c max_connections=${ES_PG_MAX_CONNECTIONS:-100} -c shared_buffers=128MB \
            $durab ${ES_PG_OPTS:-}" >"$dir/pg_ctl.log" 2>&1; then
    cat "$dir/pg_ctl.log" "$dir/server.log" >&2 || true
    rm -rf "$dir"; exit 1
  fi
  if ! "$PGBIN/createdb" -h "$dir" -p "$PORT" -U postgres "$DB" 2>"$dir/createdb.log"; then
    cat "$dir/createdb.log" >&2
    as_owner "$PGBIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"; exit 1
  fi
  conninfo "$dir"
}

stop() {
  local dir; dir=$(resolve_dir "${1:-}")
  [ -d "$dir/data" ] || { echo "pg.sh: no cluster in $dir" >&2; exit 1; }
  case $dir in /|"") exit 2 ;; esac
  as_owner "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null 2>&1 \
    || as_owner "$PGBIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}

case ${1:-} in
  start) start ;;
  stop)  stop "${2:-}" ;;
  url)   conninfo "$(resolve_dir "${2:-}")" ;;
  *) echo "usage: $0 start | stop DIR|CONNINFO | url DIR" >&2; exit 2 ;;
esac
