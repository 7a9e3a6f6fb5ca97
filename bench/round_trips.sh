#!/usr/bin/env bash
# Round trips to PostgreSQL per command: the order service's add_item (what
# POST /orders/{id}/items runs: fold, then append + the inline read model
# in one transaction), counted as libpq's sendto() calls under strace (one
# per round trip: libpq flushes once per trip, pipelines included).
#
#   bench/round_trips.sh          (after make; ES_DATABASE_URL, else
#                                  ES_TEST_DATABASE_URL, else a throwaway
#                                  PostgreSQL)
#
# Prints `add_item_round_trips N per command`: the difference between a
# run of 20 and of 120 commands, so connecting and migrating do not count;
# `add_item_round_trips_state_cache`: the same with the repository's state
# cache (what the HTTP service runs: no fold); `add_item_round_trips_caller_tx`:
# each command inside a transaction of the caller's (store:begin() ...
# store:commit(), the commit's round trip included), as a workflow's
# commands run.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
command -v strace >/dev/null || { echo "bench/round_trips.sh: strace not installed" >&2; exit 1; }
PG_URL=
cleanup() { if [ -n "$PG_URL" ]; then scripts/pg.sh stop "$PG_URL" >/dev/null 2>&1 || true; fi; }
trap cleanup EXIT
URL=${ES_DATABASE_URL:-${ES_TEST_DATABASE_URL:-}}
if [ -z "$URL" ]; then PG_URL=$(scripts/pg.sh start | tail -n 1); URL=$PG_URL; fi
export LUA_PATH="$ROOT/lua/?.lua;$ROOT/lua/?/init.lua;$ROOT/examples/?.lua;;"
export LUA_CPATH="$ROOT/build/lua5.4/?.so;;"

count() {   # sendto() calls of a run of $1 add_item commands ($2: cache | tx)
  local out
  out=$(U=$URL N=$1 C=${2:-} S="es_rt_$$_$1" strace -f -c -e trace=sendto lua5.4 -e '
    local es = require "eventsourcing"
    local service = require "orders.service"
    local store = assert(es.open(os.getenv("U"), { schema = os.getenv("S") }))
    assert(service.migrate(store))
    local svc = service.new(store, { cache = os.getenv("C") == "cache" and es.state_cache() or nil })
    local id = assert(svc.create_order({ customer_id = "rt" }, { user = "rt" }))
    local tx = os.getenv("C") == "tx"
    for k = 1, tonumber(os.getenv("N")) do
      if tx then assert(store:begin()) end
      assert(svc.add_item { order_id = id, product_id = "p" .. k, quantity = 1, unit_price = 100 })
      if tx then assert(store:commit()) end
    end
    assert(store:query("DROP SCHEMA " .. os.getenv("S") .. " CASCADE"))' 2>&1 >/dev/null)
  awk '$NF == "sendto" { print $4 }' <<<"$out"
}
a=$(count 20)
b=$(count 120)
awk -v a="$a" -v b="$b" 'BEGIN { printf "add_item_round_trips %.2f per command\n", (b - a) / 100 }'
a=$(count 20 cache)
b=$(count 120 cache)
awk -v a="$a" -v b="$b" 'BEGIN { printf "add_item_round_trips_state_cache %.2f per command\n", (b - a) / 100 }'
a=$(count 20 tx)
b=$(count 120 tx)
awk -v a="$a" -v b="$b" 'BEGIN { printf "add_item_round_trips_caller_tx %.2f per command\n", (b - a) / 100 }'
