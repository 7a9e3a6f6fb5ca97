#!/usr/bin/env bash
# bench/command_instructions.sh - instructions per POST /orders/{id}/items in
# what a pool thread runs (orders.http.worker.handle: routing, the fold, the
# command, the inline read model, the reply's JSON, libpq's client side),
# counted by callgrind under LuaJIT's interpreter (-joff): the same figure
# on a busy machine as on a quiet one (+-0.5%), where CPU times sway by 10%
# and more, so two variants of the Lua side can be told apart by a percent.
# (With the JIT on, the count moves by several percent between runs of the
# same code; in nginx's pool much of the command runs interpreted anyway:
# closures and C calls end traces.)
#
#   bench/command_instructions.sh [LINES...]      (default: 3 15)
#
# For each LINES (item lines per order when the run starts), runs
# bench/command_instructions.lua twice, with 100 and 400 commands, and
# prints `add_item_instructions_lines<LINES> <n> per command`, the
# difference divided by 300 (start-up, seeding and the schema drop out).
# The database: ES_DATABASE_URL, else ES_TEST_DATABASE_URL, else a
# throwaway PostgreSQL. Needs valgrind; build first (make). About half a
# minute per LINES.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "command_instructions: needs valgrind" >&2; exit 2; }
[ -f build/luajit/eventsourcing/core.so ] || { echo "command_instructions: run make first" >&2; exit 2; }

URL=${ES_DATABASE_URL:-${ES_TEST_DATABASE_URL:-}}
PG_URL=
OUT=$(mktemp -d /tmp/es-cmd-ins.XXXXXX)
cleanup() {
  [ -n "$PG_URL" ] && scripts/pg.sh stop "$PG_URL" >/dev/null 2>&1
  rm -rf "$OUT"
}
trap cleanup EXIT
if [ -z "$URL" ]; then
  PG_URL=$(scripts/pg.sh start | tail -n 1)
  URL=$PG_URL
fi

export LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" LUA_CPATH="build/luajit/?.so;;"
# instructions of one run of N commands on orders of LINES lines
count() {
  local n=$1 lines=$2 file=$OUT/cg.$1.$2
  valgrind --tool=callgrind --callgrind-out-file="$file" --smc-check=all-non-file \
    luajit -joff bench/command_instructions.lua "$URL" "$n" "$lines" >"$OUT/log" 2>&1 \
    || { cat "$OUT/log" >&2; return 1; }
  callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'
}
for lines in "${@:-3 15}"; do
  for l in $lines; do
    a=$(count 100 "$l")
    b=$(count 400 "$l")
    echo "add_item_instructions_lines$l $(( (b - a) / 300 )) per command"
  done
done
