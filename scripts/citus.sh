#!/usr/bin/env bash
# A throwaway Citus cluster for the specs and benchmarks (docs/scale-out.md).
#
#   scripts/citus.sh test [SPEC...]   start a cluster (coordinator + 2 workers),
#                                     run the specs against it with stores laid
#                                     out distributed, stop it; prints
#                                     `N passed, N failed` last (make test-citus)
#   scripts/citus.sh bench            appends at 8 and 32 clients (1 and 100 events
#                                     each) on one PostgreSQL, through the
#                                     coordinator and connected to a worker, then
#                                     catch-up of ES_BENCH_EVENTS (1,000,000) events
#                                     (make bench-citus; figures in docs/scale-out.md;
#                                     ES_BENCH_SECS 5, ES_BENCH_SIZES "1 100",
#                                     ES_BENCH_CATCHUP 0 skips the catch-up)
#   scripts/citus.sh start DIR        start one, print the coordinator's conninfo
#   scripts/citus.sh stop DIR
#
# Uses an installed Citus (the extension in PostgreSQL 15); without one, as
# root, builds it from ../shared/citus (beside the repository) with its
# build.sh. Neither there: `test` says so and skips (exit 0, no counts).
# As root (servers run as user postgres). ES_CITUS_WORKERS (2), ES_CITUS_PORT
# (a free base port), ES_TEST_SHARDS (4), ES_TEST_FLAVOURS as for make test.
set -uo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ES_ROOT" || exit 1

BIN=/usr/lib/postgresql/15/bin
SHARED=$ES_ROOT/../shared/citus
CONTROL=/usr/share/postgresql/15/extension/citus.control

installed() { [ -f "$CONTROL" ]; }

# Makes sure Citus is installed: 0 yes, 1 cannot (message printed).
ensure_citus() {
  installed && return 0
  if [ ! -x "$SHARED/build.sh" ]; then
    es_log "citus: not installed, and no $SHARED/build.sh to build it from"
    return 1
  fi
  es_is_root || { es_log "citus: building it needs root"; return 1; }
  local t0=$SECONDS
  "$SHARED/build.sh" >&2 || { es_log "citus: build failed"; return 1; }
  es_log "citus: built and installed in $((SECONDS - t0))s"
}

port_free() { ! ss -Htln "sport = :$1" 2>/dev/null | grep -q .; }

# A base port with WORKERS+1 free ports after it, below the ephemeral range.
free_base() {
  local n=$1 base i ok
  for _ in $(seq 1 50); do
    base=$((20000 + RANDOM % 10000)) ok=1
    for i in $(seq 0 "$n"); do port_free $((base + i)) || { ok=0; break; }; done
    [ $ok = 1 ] && { echo "$base"; return 0; }
  done
  return 1
}

pg() { runuser -u postgres -- "$@"; }

# start DIR: coordinator on the base port, workers after it.
start() {
  local dir=$1 n=${ES_CITUS_WORKERS:-2} base i d port
  base=${ES_CITUS_PORT:-$(free_base "$n")} || es_die "no free ports"
  mkdir -p "$dir" && chown postgres "$dir" || es_die "cannot use $dir"
  echo "$base" >"$dir/base_port"
  for i in $(seq 0 "$n"); do
    d=$dir/node$i port=$((base + i))
    pg $BIN/initdb -D "$d" -U postgres -A trust --no-sync -E UTF8 --locale=C.UTF-8 >/dev/null ||
      es_die "initdb failed"
    printf '%s\n' "shared_preload_libraries = 'citus'" "listen_addresses = '127.0.0.1'" \
      "port = $port" "unix_socket_directories = '$dir'" "max_connections = 300" \
      "wal_level = logical" "max_prepared_transactions = 100" "fsync = off" \
      "synchronous_commit = off" "full_page_writes = off" >>"$d/postgresql.conf"
    pg $BIN/pg_ctl -D "$d" -l "$dir/node$i.log" -w start >/dev/null ||
      { cat "$dir/node$i.log" >&2; es_die "node $i did not start"; }
    pg psql -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -c 'CREATE EXTENSION citus' >/dev/null ||
      es_die "CREATE EXTENSION citus failed on node $i"
  done
  local P="pg psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p $base -U postgres -d postgres"
  $P -c "SELECT citus_set_coordinator_host('127.0.0.1', $base)" >/dev/null || es_die "coordinator setup failed"
  for i in $(seq 1 "$n"); do
    $P -c "SELECT citus_add_node('127.0.0.1', $((base + i)))" >/dev/null || es_die "citus_add_node failed"
  done
  echo "host=127.0.0.1 port=$base user=postgres dbname=postgres"
}

stop() {
  local d
  for d in "$1"/node*; do
    [ -f "$d/postmaster.pid" ] && pg $BIN/pg_ctl -D "$d" -m immediate -w stop >/dev/null
  done
  true
}

run_tests() {
  es_is_root || es_die "scripts/citus.sh test runs as root (servers run as user postgres)"
  if ! ensure_citus; then
    echo "test-citus: skipped (Citus is not installed and ../shared/citus is absent)"
    exit 0
  fi
  local url t0=$SECONDS
  CLUSTER_DIR=$(mktemp -d "${TMPDIR:-/tmp}/es-citus.XXXXXX")
  local dir=$CLUSTER_DIR
  trap 'stop "$CLUSTER_DIR"; rm -rf "$CLUSTER_DIR"' EXIT
  trap es_on_interrupt INT TERM
  url=$(start "$dir" | tail -1) || es_die "the cluster did not start"
  echo "test-citus: cluster up at $url ($((SECONDS - t0))s)"
  local specs=("$@")
  [ ${#specs[@]} -gt 0 ] || specs=(spec/03_store_spec.lua spec/04_global_order_spec.lua
    spec/08_pipeline_spec.lua spec/11_inline_ahead_spec.lua
    spec/11_repository_spec.lua spec/13_state_cache_spec.lua spec/21_projector_spec.lua
    spec/24_follower_spec.lua spec/26_rebuild_spec.lua
    spec/40_workflow_spec.lua spec/50_citus_spec.lua spec/52_citus_group_spec.lua)
  ES_TEST_DISTRIBUTED=1 ES_TEST_SHARDS=${ES_TEST_SHARDS:-4} ES_TEST_DATABASE_URL=$url \
    ES_CITUS_DIR=$dir scripts/test.sh "${specs[@]}"
}

# appends URL SCHEMA CLIENTS SIZE : events/s of CLIENTS bench/append.lua
# processes appending SIZE events per call for ES_BENCH_SECS seconds.
appends() {
  local url=$1 schema=$2 clients=$3 size=$4 secs=${ES_BENCH_SECS:-5} i out
  out=$(mktemp -d "${TMPDIR:-/tmp}/es-bench.XXXXXX")
  for i in $(seq 1 "$clients"); do
    LUA_PATH="$ES_LPATH;;" LUA_CPATH="build/lua5.4/?.so;;" \
      lua5.4 bench/append.lua "$url" "$schema" "$i" "$size" "$secs" >"$out/$i" 2>&1 &
  done
  wait
  awk '/^events/ { ev += $2; s += $4; n++ } END { if (n) printf "%.0f", ev / (s / n) }' "$out"/*
  rm -rf "$out"
}

lua_eval() {
  LUA_PATH="$ES_LPATH;;" LUA_CPATH="build/lua5.4/?.so;;" lua5.4 -e "$1"
}

run_bench() {
  es_is_root || es_die "scripts/citus.sh bench runs as root"
  ensure_citus || es_die "Citus is not installed (and ../shared/citus is absent)"
  local url wurl c size
  CLUSTER_DIR=$(mktemp -d "${TMPDIR:-/tmp}/es-citus.XXXXXX")
  local dir=$CLUSTER_DIR
  trap 'stop "$CLUSTER_DIR"; rm -rf "$CLUSTER_DIR"' EXIT
  url=$(start "$dir" | tail -1) || es_die "the cluster did not start"
  wurl="host=127.0.0.1 port=$(( $(cat "$dir/base_port") + 1 )) user=postgres dbname=postgres"
  # one PostgreSQL: the coordinator's own, with a schema that is not distributed
  lua_eval "local es = require 'eventsourcing'
    assert(assert(es.open('$url', { schema = 'bench_single' })):migrate())
    assert(assert(es.open('$url', { schema = 'bench_dist' })):migrate({ distributed = true }))"
  echo "citus bench: $(nproc) cores, ${ES_BENCH_SECS:-5} s per phase, events/s (sum of clients)"
  printf '%-8s %-8s %12s %12s %12s\n' clients events single-node coordinator worker
  for size in ${ES_BENCH_SIZES:-1 100}; do
    for c in 8 32; do
      printf '%-8s %-8s %12s %12s %12s\n' "$c" "$size" \
        "$(appends "$url" bench_single "$c" "$size")" \
        "$(appends "$url" bench_dist "$c" "$size")" \
        "$(appends "$wurl" bench_dist "$c" "$size")"
    done
  done
  [ "${ES_BENCH_CATCHUP:-1}" = 0 ] || catch_up "$url"
}

# catch_up URL: ES_BENCH_EVENTS events in 1,000-event streams, then the
# time one read_all follower takes to read them all, single-node and on
# Citus (all shards in one cursor).
catch_up() {
  local n=${ES_BENCH_EVENTS:-1000000}
  lua_eval "
    local es = require 'eventsourcing'
    local core = require 'eventsourcing.core'
    local function seed(schema, opts)
      local s = assert(es.open('$1', { schema = schema }))
      assert(s:migrate(opts))
      local t0 = core.monotonic()
      assert(s:query('INSERT INTO ' .. schema .. '.events (id, stream, version, type, data, metadata, category)'
        .. ' SELECT gen_random_uuid(), \'Seed-\' || (g / 1000), g % 1000 + 1, \'Ticked\','
        .. ' \'{\"n\": 1, \"note\": \"hello\"}\', \'{}\', \'Seed\' FROM generate_series(0, $n - 1) g'))
      local seeded = core.monotonic() - t0
      t0 = core.monotonic()
      local cp, total = nil, 0
      while true do
        local b, ncp = assert(s:read_all({ after = cp, limit = 1000 }))
        if #b == 0 then break end
        total, cp = total + #b, ncp
      end
      local dt = core.monotonic() - t0
      print(('catch-up %-12s %d events: seeded in %.1f s, read in %.1f s (%.0f events/s)')
        :format(opts and 'citus' or 'single-node', total, seeded, dt, total / dt))
    end
    seed('bench_cu_single', nil)
    seed('bench_cu_dist', { distributed = true })"
  # the same log, one follower process per worker (each on that worker's
  # shards), then one per shard
  local w=${ES_CITUS_WORKERS:-2} sh
  followers "$1" "worker" "$(seq 1 "$w" | sed 's/.*/AND groupid = &/')"
  sh=$(lua_eval "local es = require 'eventsourcing'
    local s = assert(es.open('$1', { schema = 'bench_cu_dist' }))
    for _, r in ipairs(assert(s:query('SELECT shardid FROM pg_dist_shard'
      .. ' WHERE logicalrelid = \'bench_cu_dist.events\'::regclass ORDER BY shardid'))) do print(r.shardid) end")
  followers "$1" "shard" "$(printf '%s\n' "$sh" | sed 's/.*/AND shardid = &/')"
}

# followers URL WHAT CONDITIONS: one read_all process per line of
# CONDITIONS (a filter on pg_dist_shard x pg_dist_placement naming its
# shards), all at once over bench_cu_dist; prints the time they took.
followers() {
  local url=$1 what=$2 cond n=0 t0 t1
  rm -f "$CLUSTER_DIR"/follower.*
  t0=$(date +%s.%N)
  while IFS= read -r cond; do
    [ -n "$cond" ] || continue
    n=$((n + 1))
    lua_eval "
      local es = require 'eventsourcing'
      local s = assert(es.open('$url', { schema = 'bench_cu_dist' }))
      local ids = {}
      for _, r in ipairs(assert(s:query('SELECT shardid FROM pg_dist_shard JOIN pg_dist_placement USING (shardid)'
        .. ' WHERE logicalrelid = \'bench_cu_dist.events\'::regclass $cond'))) do ids[#ids + 1] = r.shardid end
      local cp, total = nil, 0
      while true do
        local b, ncp = assert(s:read_all({ after = cp, limit = 1000, shards = ids }))
        if #b == 0 then break end
        total, cp = total + #b, ncp
      end
      print(total)" >"$CLUSTER_DIR/follower.$n" &
  done <<<"$3"
  wait
  t1=$(date +%s.%N)
  awk -v t0="$t0" -v t1="$t1" -v p="$n" -v what="$what" '{ n += $1 } END {
    printf "catch-up citus       %d events: one follower per %s (%d processes) in %.1f s (%.0f events/s)\n",
      n, what, p, t1 - t0, n / (t1 - t0) }' "$CLUSTER_DIR"/follower.*
}

case ${1:-} in
  test) shift; run_tests "$@" ;;
  bench) run_bench ;;
  start) [ -n "${2:-}" ] || es_die "usage: $0 start DIR"; ensure_citus || exit 1; start "$2" ;;
  stop) [ -n "${2:-}" ] || es_die "usage: $0 stop DIR"; stop "$2" ;;
  *) es_die "usage: $0 test [SPEC...] | start DIR | stop DIR" ;;
esac
