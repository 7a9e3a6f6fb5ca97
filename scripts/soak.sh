#!/usr/bin/env bash
# make soak: a bounded load run (SOAK_SECONDS, default 60) against a
# throwaway PostgreSQL: 8 writer processes, 2 projectors on the same read
# models, the order workflows' runner and HTTP traffic through nginx, with
# PostgreSQL crashed and restarted (pg_ctl restart -m immediate) halfway.
# Then checks that nothing was lost, doubled or half stored, that read
# models equal a rebuild and workflow effects happened once
# (scripts/soak.lua). Last line: `N passed, N failed` (one per check).
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ES_ROOT" || exit 1

if es_is_root; then scripts/deps.sh || es_die "scripts/deps.sh failed"; fi
make -s all || es_die "build failed"

DIR=$(mktemp -d /tmp/es-soak.XXXXXX) || es_die "mktemp failed"
chmod 755 "$DIR"   # nginx workers (nobody) reach their temp files below it
PG_URL= NGINX_PREFIX=
cleanup() {
  [ -z "$NGINX_PREFIX" ] || examples/orders/http/nginx.sh stop "$NGINX_PREFIX" >/dev/null 2>&1 || true
  pkill -f "scripts/soak.lua (writer|projector|runner|http) " 2>/dev/null || true
  [ -z "$PG_URL" ] || scripts/pg.sh stop "$PG_URL" || true
  if [ -n "${SOAK_KEEP:-}" ]; then echo "soak: logs kept in $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# synchronous_commit on: an acknowledged commit must survive the crash
# (with it off, PostgreSQL may lose the last commits it acknowledged, and
# this run counts them as lost: it did, 13 of 36,093 in one run)
PG_URL=$(ES_PG_FSYNC=on ES_PG_MAX_CONNECTIONS=100 scripts/pg.sh start | tail -n 1) || es_die "could not start PostgreSQL"
PGDATA=${PG_URL#*host=}; PGDATA=${PGDATA%% *}/data
export SOAK_URL=$PG_URL SOAK_SCHEMA=es_soak SOAK_DIR=$DIR/run SOAK_PGDATA=$PGDATA
export SOAK_SECONDS=${SOAK_SECONDS:-60}
mkdir -p "$SOAK_DIR"
export LUA_PATH="$ES_ROOT/lua/?.lua;$ES_ROOT/lua/?/init.lua;$ES_ROOT/examples/?.lua;;"
export LUA_CPATH="$ES_ROOT/build/lua5.4/?.so;;"

# nginx serves the order service; the soak's projectors keep its read model
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
  PORT=$(( 20000 + ($$ * 31 + RANDOM) % 40000 ))
  lua5.4 -e '
    local es = require "eventsourcing"
    local s = assert(es.open(os.getenv("SOAK_URL"), { schema = os.getenv("SOAK_SCHEMA") }))
    assert(require("orders.service").migrate(s))' || es_die "migration failed"
  NGINX_PREFIX=$DIR/nginx
  if PORT=$PORT ES_HTTP_DATABASE_URL=$PG_URL ES_HTTP_SCHEMA=$SOAK_SCHEMA ES_HTTP_READ_MODEL=projector \
       ES_HTTP_THREADS=8 examples/orders/http/nginx.sh start "$NGINX_PREFIX"; then
    export SOAK_PORT=$PORT
  else
    NGINX_PREFIX=
    echo "soak: nginx did not start: running without HTTP traffic" >&2
  fi
fi

lua5.4 scripts/soak.lua run
rc=$?
if [ "$rc" != 0 ]; then
  echo "soak: logs of the roles:" >&2
  for f in "$SOAK_DIR"/*.log; do [ -s "$f" ] && { echo "--- $f" >&2; tail -n 5 "$f" >&2; }; done
fi
exit "$rc"
