#!/usr/bin/env bash
# make demo: the order service walk-through (examples/orders/demo.lua).
#
#   scripts/demo.sh                 a throwaway PostgreSQL, stopped afterwards
#   ES_DATABASE_URL=... scripts/demo.sh    an existing database (the demo uses
#                                   its own schema, ES_DEMO_SCHEMA=es_demo,
#                                   which it empties first)
#   ES_DATABASE_URL=memory: scripts/demo.sh   the in-memory store
# As root, missing Debian packages are installed first (scripts/deps.sh).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ES_ROOT"

if es_is_root; then scripts/deps.sh || es_die "scripts/deps.sh failed"; fi
[ -f build/lua5.4/eventsourcing/core.so ] || make all >&2 || es_die "build failed"

PG_URL=
cleanup() {
  if [ -n "$PG_URL" ]; then scripts/pg.sh stop "$PG_URL" >/dev/null 2>&1 || true; PG_URL=; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

url=${ES_DATABASE_URL:-}
if [ -z "$url" ]; then
  echo "demo: starting a throwaway PostgreSQL..." >&2
  PG_URL=$(scripts/pg.sh start | tail -n 1) || es_die "could not start PostgreSQL (scripts/pg.sh start)"
  url=$PG_URL
fi

LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" \
LUA_CPATH="build/lua5.4/?.so;;" \
  lua5.4 examples/orders/demo.lua "$url"
