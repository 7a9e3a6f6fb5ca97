#!/usr/bin/env bash
# make bench: every benchmark, each against a named alternative in the same
# run, one `name value unit` line per figure, then a summary block of all of
# them. A failing benchmark makes the script exit non-zero (the others still
# run; the throwaway cluster is stopped either way).
#
#   scripts/bench.sh
#   ES_BENCH_DATABASE_URL=conninfo   use that server instead of a throwaway
#                                    cluster (default: one started here with
#                                    ES_PG_FSYNC=on, stopped at the end)
#   BENCH_SECS=6                     length of each measured append phase
#   BENCH_ROUNDS=5                   rounds of fold / codec (best is kept)
#   BENCH_CMD_SECS=5                 length of each commands phase
#   BENCH_EVENTS=1000000             events replayed by the rebuild bench
#   BENCH_NAIVE=100000               events the naive UPDATE loop applies
#   BENCH_LAG_N=300                  lag samples (head polling; a third for 100 ms polling)
#   BENCH_HTTP_SECS=5                length of each wrk run
#
# Benchmarks:
#   codec    bench/codec.lua (es.json against lua-cjson), lua5.4 and luajit
#   append   bench/append.lua, 2 client processes, 1 and 100 events per append,
#            against pgbench with plain prepared INSERTs into a bare table with
#            the same columns and keys (bench/pgbench_insert*.sql, bench/bare.sql)
#   fold     bench/fold.lua, store:fold against lua-sql-postgres + lua-cjson
#   commands bench/commands.lua, AddItem end to end, 2 client processes, 10
#            and 1,000 prior events, without snapshots against snapshot_every
#            = 100, lua5.4 and luajit
#   rebuild  bench/rebuild.lua, rebuild of rm_orders from 1,000,000 events
#            against a naive UPDATE-per-event loop, lua5.4 and luajit
#   group    bench/group_catchup.lua, catch-up of a read model over
#            BENCH_GROUP_EVENTS (1,000,000) events by a consumer group of 1, 2
#            and 4 member processes, against one plain projector, lua5.4
#   lag      bench/lag.lua, append -> read-model row visible with a live
#            projector polling the log's head every 5 ms (no NOTIFY) against
#            100 ms polling, idle and with 4 writers, lua5.4 and luajit
#   http     bench/http.sh, wrk on nginx: GET /orders/{id} and POST
#            /orders/{id}/items at 2 and 32 connections, against GET /health
#   pooler   bench/pooler.sh, appends and folds at 8 and 32 clients: named
#            prepared statements straight to PostgreSQL against unnamed ones
#            (pooler = "transaction") straight and through PgBouncer
#            (transaction pooling), lua5.4; BENCH_POOLER_SECS=3 per phase
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ES_ROOT" || exit 1

SECS=${BENCH_SECS:-6}
CLIENTS=2
OUT=$(mktemp -d "${TMPDIR:-/tmp}/es-bench.XXXXXX")
RESULTS=$OUT/results
: >"$RESULTS"

PG_URL=
cleanup() {
  if [ -n "$PG_URL" ]; then scripts/pg.sh stop "$PG_URL" || true; PG_URL=; fi
  rm -rf "$OUT"
}
trap cleanup EXIT
trap 'echo interrupted >&2; exit 130' INT TERM

for f in lua5.4 luajit; do
  [ -f "build/$f/eventsourcing/core.so" ] || es_die "build/$f/eventsourcing/core.so missing: run make first"
done
command -v pgbench >/dev/null || es_die "pgbench not found (postgresql-client; scripts/deps.sh)"
command -v psql >/dev/null || es_die "psql not found (postgresql-client; scripts/deps.sh)"

if [ -n "${ES_BENCH_DATABASE_URL:-}" ]; then
  URL=$ES_BENCH_DATABASE_URL
  echo "bench: using ES_BENCH_DATABASE_URL=$URL"
else
  PG_URL=$(ES_PG_FSYNC=on scripts/pg.sh start | tail -1) || es_die "could not start a throwaway PostgreSQL"
  URL=$PG_URL
  echo "bench: throwaway PostgreSQL (fsync on) at $URL"
fi
SCHEMA=es_bench_$$
BARE=es_bench_bare_$$

# run FLAVOUR script args... : a Lua script with this tree's modules
run_lua() {
  local flavour=$1; shift
  LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/$flavour/?.so;;" "$flavour" "$@"
}

# record LINE : print a `name value unit` line and keep it for the summary
record() { echo "$1"; echo "$1" >>"$RESULTS"; }
value_of() { awk -v n="$1" '$1 == n { print $2 }' "$RESULTS" | tail -1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "nan" }'; }

psql_q() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 "$URL" "$@"; }

FAILED=()
fail() { FAILED+=("$1"); echo "bench: FAILED: $1" >&2; }
T_START=$(date +%s)
section() { echo; echo "== $* [$(( $(date +%s) - T_START ))s, load $(cut -d' ' -f1-3 /proc/loadavg)]"; }

# is_figure LINE : a `name value unit` line
is_figure() { [[ $1 =~ ^[A-Za-z0-9_.:/-]+[[:space:]]+[-+0-9.eE]+[[:space:]]+[^[:space:]]+ ]]; }

# bench_run LABEL SUFFIX cmd... : run a bench, record its `name value unit`
# lines (name + SUFFIX), echo the rest and its stderr; a non-zero exit or no
# figure at all counts as a failure
bench_run() {
  local label=$1 suffix=$2 rc=0 n=0 line name rest; shift 2
  "$@" >"$OUT/run.out" 2>"$OUT/run.err" || rc=$?
  while IFS= read -r line; do
    if is_figure "$line"; then
      name=${line%%[[:space:]]*}; rest=${line#"$name"}
      record "$name$suffix${rest}"; n=$((n + 1))
    else
      echo "$line"
    fi
  done <"$OUT/run.out"
  [ -s "$OUT/run.err" ] && sed 's/^/  (stderr) /' "$OUT/run.err"
  if [ $rc != 0 ]; then fail "$label (exit $rc)"
  elif [ $n = 0 ]; then fail "$label (no figures)"
  fi
}

# ---- codec ---------------------------------------------------------------
section "codec (bench/codec.lua, es.json against lua-cjson)"
for f in lua5.4 luajit; do
  bench_run "codec $f" "" run_lua "$f" bench/codec.lua
done

# ---- append ---------------------------------------------------------------
section "append ($CLIENTS clients, ${SECS}s per phase, lua5.4; against pgbench INSERTs)"
BENCH_URL=$URL BENCH_SCHEMA=$SCHEMA run_lua lua5.4 -e '
  local es = require "eventsourcing"
  local s = assert(es.open(os.getenv("BENCH_URL"), { schema = os.getenv("BENCH_SCHEMA") }))
  assert(s:migrate())' || es_die "migrate failed"

# append_phase SIZE : CLIENTS bench/append.lua processes at once; prints the
# summed rate in events/s (run in $(...): returns non-zero on failure)
append_phase() {
  local size=$1 pids=() c
  for c in $(seq 1 $CLIENTS); do
    run_lua lua5.4 bench/append.lua "$URL" "$SCHEMA" "$c" "$size" "$SECS" >"$OUT/append.$size.$c" 2>&1 &
    pids+=($!)
  done
  local failed=0
  for c in "${pids[@]}"; do wait "$c" || failed=1; done
  if [ $failed = 1 ]; then cat "$OUT"/append."$size".* >&2; return 1; fi
  cat "$OUT"/append."$size".* | awk '{ rate += $2 / $4 } END { printf "%.0f", rate }'
}

# pgbench_phase FILE : prints tps
pgbench_phase() {
  sed "s/BENCH_SCHEMA/$BARE/g" "$1" >"$OUT/pgbench.sql"
  pgbench -n -M prepared -c $CLIENTS -j $CLIENTS -T "$SECS" -f "$OUT/pgbench.sql" "$URL" \
    >"$OUT/pgbench.out" 2>&1 || { cat "$OUT/pgbench.out" >&2; return 1; }
  sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$OUT/pgbench.out" | head -1
}

if sed "s/BENCH_SCHEMA/$BARE/g" bench/bare.sql | psql_q >/dev/null; then
  for size in 1 100; do
    script=bench/pgbench_insert.sql; [ $size = 100 ] && script=bench/pgbench_insert100.sql
    if r=$(append_phase $size) && [ -n "$r" ]; then
      record "append_${size}_es $r events/s"
    else
      fail "append $size (bench/append.lua)"; r=
    fi
    if tps=$(pgbench_phase $script) && [ -n "$tps" ]; then
      ev=$(awk -v t="$tps" -v n=$size 'BEGIN { printf "%.0f", t * n }')
      record "append_${size}_pgbench_insert $ev events/s"
      [ -n "$r" ] && record "append_${size}_ratio $(ratio "$r" "$ev") x"
    else
      fail "append $size (pgbench)"
    fi
  done
else
  fail "append (could not create the bare table)"
fi

# ---- fold -----------------------------------------------------------------
section "fold (100,000 events; store:fold against lua-sql-postgres + lua-cjson)"
for f in lua5.4 luajit; do
  bench_run "fold $f" "" run_lua "$f" bench/fold.lua "$URL" "$SCHEMA"
done

psql_q -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" -c "DROP SCHEMA IF EXISTS $BARE CASCADE" >/dev/null 2>&1 || true

# ---- commands -------------------------------------------------------------
CMD_SECS=${BENCH_CMD_SECS:-5}
section "commands (AddItem end to end, $CLIENTS clients, ${CMD_SECS}s per phase; snapshots against none)"
for f in lua5.4 luajit; do
  bench_run "commands $f" "" env BENCH_SECS="$CMD_SECS" BENCH_CLIENTS=$CLIENTS \
    LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" LUA_CPATH="build/$f/?.so;;" \
    "$f" bench/commands.lua "$URL"
done

# ---- rebuild --------------------------------------------------------------
EVENTS=${BENCH_EVENTS:-1000000}
section "rebuild (rm_orders from $EVENTS events; against one UPDATE per event)"
for f in lua5.4 luajit; do
  bench_run "rebuild $f" "_$f" env ES_BENCH_DATABASE_URL="$URL" ES_BENCH_EVENTS="$EVENTS" \
    ES_BENCH_NAIVE="${BENCH_NAIVE:-100000}" \
    LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" LUA_CPATH="build/$f/?.so;;" \
    "$f" bench/rebuild.lua
done

# ---- lag ------------------------------------------------------------------
section "lag (append -> read-model row visible; 5 ms head polling against 100 ms polling, idle and with 4 writers)"
for f in lua5.4 luajit; do
  bench_run "lag $f" "_$f" env ES_BENCH_DATABASE_URL="$URL" ES_BENCH_LAG_N="${BENCH_LAG_N:-300}" \
    LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" LUA_CPATH="build/$f/?.so;;" \
    "$f" bench/lag.lua
done

# ---- group catch-up --------------------------------------------------------
GROUP_EVENTS=${BENCH_GROUP_EVENTS:-1000000}
section "group catch-up ($GROUP_EVENTS events, 16 partitions, 1/2/4 member processes; against one plain projector)"
bench_run "group catch-up lua5.4" "" env ES_BENCH_DATABASE_URL="$URL" ES_BENCH_GROUP_EVENTS="$GROUP_EVENTS" \
  LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" LUA_CPATH="build/lua5.4/?.so;;" \
  lua5.4 bench/group_catchup.lua

# ---- http -----------------------------------------------------------------
section "http (wrk on nginx, ${BENCH_HTTP_SECS:-5}s per run; against GET /health)"
bench_run "http" "" env ES_DATABASE_URL="$URL" ES_BENCH_SECONDS="${BENCH_HTTP_SECS:-5}" bash bench/http.sh

section "pooler: appends and folds, prepared direct vs unnamed direct and through PgBouncer"
bench_run "pooler" "" bash bench/pooler.sh "$URL" "${BENCH_POOLER_SECS:-3}"
bad=$(awk '$1 ~ /^http_.*_non2xx$/ && $2 > 0 { print $1 "=" $2 }' "$RESULTS" | tr '\n' ' ')
[ -n "$bad" ] && fail "http: non-2xx responses: $bad"

# ---- summary --------------------------------------------------------------
FSYNC=$(psql_q -At -c "SHOW fsync" 2>/dev/null || echo "?")
section "summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), fsync=$FSYNC, $CLIENTS clients)"
while read -r name value unit; do
  printf '  %-48s %14s %s\n' "$name" "$value" "$unit"
done <"$RESULTS"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "== FAILED: ${#FAILED[@]} benchmark(s)"
  printf '  %s\n' "${FAILED[@]}"
  exit 1
fi
exit 0
