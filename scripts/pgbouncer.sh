#!/usr/bin/env bash
# A throwaway PgBouncer (Debian's package) in front of a PostgreSQL given by
# its conninfo, in a temporary folder, unix socket only.
#
#   scripts/pgbouncer.sh start CONNINFO   start one; prints the conninfo to
#                                         reach the server through it (last
#                                         line), e.g.
#                                         host=/tmp/es-pgb.AbC123 port=6432 dbname=eventsourcing_test user=postgres
#   scripts/pgbouncer.sh stop DIR         stop it and remove DIR (DIR may also
#                                         be the conninfo printed by start)
#
# CONNINFO must name host (a socket folder or address), dbname and user, as
# scripts/pg.sh prints them. Settings: ES_PGB_MODE (pool_mode, default
# transaction), ES_PGB_POOL (default_pool_size, default 4: fewer server
# sessions than the specs' clients), ES_PGB_PORT (default 6432).
# PgBouncer refuses to run as root: as root it runs as the `postgres` user.
set -euo pipefail

MODE=${ES_PGB_MODE:-transaction}
POOL=${ES_PGB_POOL:-4}
PORT=${ES_PGB_PORT:-6432}

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# kv CONNINFO KEY: the value of KEY in a plain `k=v k=v` conninfo.
kv() {
  local w
  for w in $1; do
    case $w in "$2"=*) printf '%s\n' "${w#*=}"; return 0 ;; esac
  done
  return 1
}

resolve_dir() {
  local arg=${1:-}
  [ -n "$arg" ] || { echo "pgbouncer.sh: which one? pass its folder or conninfo" >&2; exit 2; }
  if [[ $arg == *host=* ]]; then arg=$(kv "$arg" host); fi
  printf '%s\n' "$arg"
}

start() {
  local server=$1 host port db user dir
  command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] \
    || { echo "pgbouncer.sh: pgbouncer not found (apt-get install pgbouncer; scripts/deps.sh)" >&2; exit 1; }
  host=$(kv "$server" host) || { echo "pgbouncer.sh: no host= in '$server'" >&2; exit 2; }
  port=$(kv "$server" port || echo 5432)
  db=$(kv "$server" dbname) || { echo "pgbouncer.sh: no dbname= in '$server'" >&2; exit 2; }
  user=$(kv "$server" user || echo postgres)
  dir=$(mktemp -d "${ES_PG_TMP:-/tmp}/es-pgb.XXXXXX")
  chmod 755 "$dir"
  # auth_type=any: clients are not checked (the socket is private to this
  # folder); every database logs in to the server as the given user.
  cat >"$dir/pgbouncer.ini" <<EOF
[databases]
* = host=$host port=$port user=$user
[pgbouncer]
listen_addr =
unix_socket_dir = $dir
listen_port = $PORT
auth_type = any
pool_mode = $MODE
default_pool_size = $POOL
min_pool_size = 0
reserve_pool_size = 0
max_db_connections = $POOL
max_client_conn = 500
server_reset_query =
ignore_startup_parameters = extra_float_digits,options
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
EOF
  [ "$(id -u)" = 0 ] && chown -R postgres: "$dir"
  if ! as_owner "$(command -v pgbouncer || echo /usr/sbin/pgbouncer)" -d -q "$dir/pgbouncer.ini"; then
    cat "$dir/pgbouncer.log" >&2 2>/dev/null || true
    rm -rf "$dir"; exit 1
  fi
  # -d returns before the socket exists
  for _ in $(seq 50); do
    [ -S "$dir/.s.PGSQL.$PORT" ] && break
    sleep 0.1
  done
  [ -S "$dir/.s.PGSQL.$PORT" ] || { echo "pgbouncer.sh: no socket after 5 s" >&2; cat "$dir/pgbouncer.log" >&2; stop "$dir"; exit 1; }
  echo "host=$dir port=$PORT dbname=$db user=$user"
}

stop() {
  local dir pid
  dir=$(resolve_dir "${1:-}")
  [ -f "$dir/pgbouncer.ini" ] || { echo "pgbouncer.sh: no pgbouncer in $dir" >&2; exit 1; }
  case $dir in /|"") exit 2 ;; esac
  pid=$(cat "$dir/pgbouncer.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -rf "$dir"
}

case ${1:-} in
  start) [ -n "${2:-}" ] || { echo "usage: $0 start CONNINFO" >&2; exit 2; }; start "$2" ;;
  stop)  stop "${2:-}" ;;
  *) echo "usage: $0 start CONNINFO | stop DIR|CONNINFO" >&2; exit 2 ;;
esac
