#!/usr/bin/env bash
# make bench: every benchmark, each against a named alternative in the same
# run, one `name value unit` line per figure, then a summary block.
#
#   scripts/bench.sh
#   ES_BENCH_DATABASE_URL=conninfo   use that server instead of a throwaway
#                                    cluster (default: one started here with
#                                    ES_PG_FSYNC=on, stopped at the end)
#   BENCH_SECS=6                     length of each measured append phase
#   BENCH_ROUNDS=5                   rounds of fold / codec (best is kept)
#
# Benchmarks:
#   codec   bench/codec.lua (es.json against lua-cjson), lua5.4 and luajit
#   append  bench/append.lua, 2 client processes, 1 and 100 events per append,
#           against pgbench with plain prepared INSERTs into a bare table with
#           the same columns and keys (bench/pgbench_insert*.sql, bench/bare.sql)
#   fold    bench/fold.lua, store:fold against lua-sql-postgres + lua-cjson
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

# ---- codec ---------------------------------------------------------------
echo "== codec (bench/codec.lua)"
for f in lua5.4 luajit; do
  if [ -f bench/codec.lua ]; then
    run_lua "$f" bench/codec.lua >"$OUT/codec.$f" 2>"$OUT/codec.$f.err" \
      || { echo "bench: codec under $f failed:" >&2; cat "$OUT/codec.$f.err" >&2; }
    while read -r line; do
      # only `name value unit` lines go to the summary
      if [[ $line =~ ^[A-Za-z0-9_.:/-]+[[:space:]]+[-0-9.eE+]+[[:space:]]+[^[:space:]]+ ]]; then
        record "$line"
      else
        echo "$line"
      fi
    done <"$OUT/codec.$f"
  else
    echo "bench: bench/codec.lua not there yet: skipped"
  fi
done

# ---- append ---------------------------------------------------------------
echo "== append ($CLIENTS clients, ${SECS}s per phase, lua5.4)"
BENCH_URL=$URL BENCH_SCHEMA=$SCHEMA run_lua lua5.4 -e '
  local es = require "eventsourcing"
  local s = assert(es.open(os.getenv("BENCH_URL"), { schema = os.getenv("BENCH_SCHEMA") }))
  assert(s:migrate())' || es_die "migrate failed"

# append_phase SIZE : CLIENTS bench/append.lua processes at once; prints the
# summed rate in events/s
append_phase() {
  local size=$1 pids=() c
  for c in $(seq 1 $CLIENTS); do
    run_lua lua5.4 bench/append.lua "$URL" "$SCHEMA" "$c" "$size" "$SECS" >"$OUT/append.$size.$c" 2>&1 &
    pids+=($!)
  done
  local failed=0
  for c in "${pids[@]}"; do wait "$c" || failed=1; done
  if [ $failed = 1 ]; then cat "$OUT"/append."$size".* >&2; es_die "append bench failed"; fi
  cat "$OUT"/append."$size".* | awk '{ rate += $2 / $4 } END { printf "%.0f", rate }'
}

# pgbench_phase FILE : prints tps
pgbench_phase() {
  sed "s/BENCH_SCHEMA/$BARE/g" "$1" >"$OUT/pgbench.sql"
  pgbench -n -M prepared -c $CLIENTS -j $CLIENTS -T "$SECS" -f "$OUT/pgbench.sql" "$URL" \
    >"$OUT/pgbench.out" 2>&1 || { cat "$OUT/pgbench.out" >&2; es_die "pgbench failed"; }
  sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$OUT/pgbench.out" | head -1
}

sed "s/BENCH_SCHEMA/$BARE/g" bench/bare.sql | psql_q >/dev/null || es_die "could not create the bare table"

r=$(append_phase 1)
record "append_1_es $r events/s"
tps=$(pgbench_phase bench/pgbench_insert.sql)
record "append_1_pgbench_insert $(printf '%.0f' "$tps") events/s"
record "append_1_ratio $(ratio "$r" "$tps") x"

r=$(append_phase 100)
record "append_100_es $r events/s"
tps=$(pgbench_phase bench/pgbench_insert100.sql)
record "append_100_pgbench_insert $(awk -v t="$tps" 'BEGIN { printf "%.0f", t * 100 }') events/s"
record "append_100_ratio $(ratio "$r" "$(awk -v t="$tps" 'BEGIN { print t * 100 }')") x"

# ---- fold -----------------------------------------------------------------
echo "== fold (100,000 events; store:fold against lua-sql-postgres + lua-cjson)"
for f in lua5.4 luajit; do
  if run_lua "$f" bench/fold.lua "$URL" "$SCHEMA" >"$OUT/fold.$f" 2>"$OUT/fold.$f.err"; then
    while read -r line; do record "$line"; done <"$OUT/fold.$f"
    [ -s "$OUT/fold.$f.err" ] && cat "$OUT/fold.$f.err"
  else
    echo "bench: fold under $f failed:" >&2; cat "$OUT/fold.$f.err" >&2
  fi
done

psql_q -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" -c "DROP SCHEMA IF EXISTS $BARE CASCADE" >/dev/null 2>&1 || true

# ---- summary --------------------------------------------------------------
echo
FSYNC=$(psql_q -At -c "SHOW fsync" 2>/dev/null || echo "?")
echo "== summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), fsync=$FSYNC, $CLIENTS clients, ${SECS}s phases)"
summ() {  # label name
  local v; v=$(value_of "$2")
  [ -n "$v" ] && printf '  %-46s %s\n' "$1" "$v $(awk -v n="$2" '$1 == n { print $3 }' "$RESULTS" | tail -1)"
}
summ "append 1 event/tx, eventsourcing" append_1_es
summ "append 1 event/tx, pgbench INSERT" append_1_pgbench_insert
summ "append 1 event/tx, ratio" append_1_ratio
summ "append 100 events/tx, eventsourcing" append_100_es
summ "append 100 events/tx, pgbench INSERT" append_100_pgbench_insert
summ "append 100 events/tx, ratio" append_100_ratio
for f in lua5.4 luajit; do
  summ "fold $f, store:fold" "fold_es_$f"
  summ "fold $f, luasql + cjson" "fold_luasql_cjson_$f"
  summ "fold $f, ratio (target >= 3)" "fold_ratio_$f"
done
grep -i ratio "$RESULTS" | grep -v -e '^append_' -e '^fold_' | sed 's/^/  codec: /'
exit 0
