#!/usr/bin/env bash
# bench/pooler.sh - appends and folds at 8 and 32 client processes, three ways:
#   direct_prepared   straight to PostgreSQL, named prepared statements
#                     (the default, pooler = "none")
#   direct_unnamed    straight to PostgreSQL, pooler = "transaction": what the
#                     unnamed statements alone cost
#   pgbouncer_unnamed through PgBouncer (pool_mode = transaction,
#                     default_pool_size = ES_PGB_POOL, default 8), pooler =
#                     "transaction": what a user behind the pooler gets
# First the cost of one call each way (bench/pooler_cost.lua, median of
# rounds taken in turn), then `pooler_<op>_<way>_c<clients> <rate> ops/s`
# lines and the ratios
# `pooler_<op>_unnamed_cost_c<n>` (direct_unnamed / direct_prepared) and
# `pooler_<op>_pgbouncer_c<n>` (pgbouncer_unnamed / direct_prepared).
#
#   bash bench/pooler.sh CONNINFO [SECONDS]     (CONNINFO as scripts/pg.sh prints)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
URL=${1:?usage: bench/pooler.sh CONNINFO [SECONDS]}
SECS=${2:-3}
FLAVOUR=${ES_BENCH_FLAVOUR:-lua5.4}
SCHEMA=es_bench_pool_$$
TMP=$(mktemp -d "${TMPDIR:-/tmp}/es-bench-pool.XXXXXX")
PGB=
cleanup() {
  [ -z "$PGB" ] || scripts/pgbouncer.sh stop "$PGB" || true
  PGOPTIONS="-c client_min_messages=warning" psql -X -q "$URL" \
    -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true
  rm -rf "$TMP"
}
trap cleanup EXIT

PGB=$(ES_PGB_POOL=${ES_PGB_POOL:-8} scripts/pgbouncer.sh start "$URL" | tail -1) \
  || { echo "bench/pooler.sh: could not start PgBouncer" >&2; exit 1; }

client() {
  LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/$FLAVOUR/?.so;;" \
    "$FLAVOUR" bench/pooler_client.lua "$@"
}
client "$URL" "$SCHEMA" none setup 0 0 || exit 1

status=0
# one call each way, taking turns in one process (robust to a busy machine)
LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/$FLAVOUR/?.so;;" \
  "$FLAVOUR" bench/pooler_cost.lua "$URL" "$PGB" "$SCHEMA" || status=1

# run TARGET POOLER OP N : N clients at once; prints their summed rate
run() {
  local target=$1 pooler=$2 op=$3 n=$4 i pids=() rc=0
  for i in $(seq "$n"); do
    client "$target" "$SCHEMA" "$pooler" "$op" "$i" "$SECS" >"$TMP/c$i" 2>&1 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || rc=1; done
  if [ $rc != 0 ]; then cat "$TMP"/c* >&2; return 1; fi
  cat "$TMP"/c* | awk '{ r += $2 / $4 } END { printf "%.0f", r }'
}

for op in append fold; do
  for n in 8 32; do
    declare -A rate=()
    for way in direct_prepared direct_unnamed pgbouncer_unnamed; do
      case $way in
        direct_prepared)   r=$(run "$URL" none "$op" "$n") ;;
        direct_unnamed)    r=$(run "$URL" transaction "$op" "$n") ;;
        pgbouncer_unnamed) r=$(run "$PGB" transaction "$op" "$n") ;;
      esac || { echo "bench/pooler.sh: $op $way $n failed" >&2; status=1; continue; }
      rate[$way]=$r
      echo "pooler_${op}_${way}_c$n $r ops/s"
    done
    if [ -n "${rate[direct_prepared]:-}" ] && [ -n "${rate[direct_unnamed]:-}" ] && [ -n "${rate[pgbouncer_unnamed]:-}" ]; then
      awk -v a="${rate[direct_unnamed]}" -v b="${rate[direct_prepared]}" -v c="${rate[pgbouncer_unnamed]}" \
        -v o="$op" -v n="$n" 'BEGIN { printf "pooler_%s_unnamed_cost_c%s %.2f x\npooler_%s_pgbouncer_c%s %.2f x\n", o, n, a / b, o, n, c / b }'
    fi
    unset rate
  done
done
exit $status
