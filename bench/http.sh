#!/usr/bin/env bash
# HTTP benchmark of the order service on nginx (wrk, Debian package wrk).
#
#   bench/http.sh            (make bench runs it via scripts/bench.sh)
#
# Prints `name value unit` lines: requests/s and p50/p99 latency for
# GET /orders/{id} and POST /orders/{id}/items at 2 and 32 connections, and
# the same for GET /health (static nginx reply, no Lua, no database) as the
# named alternative: the ceiling of nginx + wrk on this machine.
# Settings: ES_DATABASE_URL (else ES_TEST_DATABASE_URL, else a throwaway
# PostgreSQL), ES_BENCH_SECONDS (per run, default 5), ES_BENCH_ORDERS
# (default 1000), ES_HTTP_WORKERS (default 1), ES_HTTP_THREADS (pool
# threads per worker, default 16: nginx.sh's defaults, see below), PORT,
# ES_HTTP_TIMINGS=1 (also the mean time per phase of a request, from the
# Server-Timing header the service then sends: *_phase_* lines), and
# ES_BENCH_ONLY=get|post|health (only those runs), ES_BENCH_CONNS (the
# connection counts, default "2 32"). ES_HTTP_FAST_GET=off:
# every GET through the thread pool (no version probe on the event loop).
# POST runs come twice, the first without the service's state cache
# (`*_nocache`: each command reads and folds its order's stream).
# Also the CPU per request of nginx's workers, PostgreSQL and wrk itself
# (*_cpu_* lines): on 2 shared cores wrk's own CPU is part of the picture.
# nginx's is also split between its event loops (*_cpu_nginx_loop) and its
# thread pools (*_cpu_nginx_pool), and *_switches_nginx / *_switches_pg
# count the context switches per request of nginx's threads and of
# PostgreSQL's processes (each round trip to the database is one on each
# side; on this machine a switch costs more than most of a request's Lua).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SECS=${ES_BENCH_SECONDS:-5}
ORDERS=${ES_BENCH_ORDERS:-1000}
TOKEN=admin-token-0123456789
command -v wrk >/dev/null || { echo "bench/http.sh: wrk not installed (apt-get install wrk)" >&2; exit 1; }
[ -f build/luajit/eventsourcing/core.so ] && [ -f build/lua5.4/eventsourcing/core.so ] \
  || { echo "bench/http.sh: run make first" >&2; exit 1; }

WORK=$(mktemp -d /tmp/es-http-bench.XXXXXX)
chmod 755 "$WORK"
PG_URL=
cleanup() {
  examples/orders/http/nginx.sh stop "$WORK/nginx" >/dev/null 2>&1 || true
  # the bench's own schema, when the database is someone's to keep
  [ -z "$PG_URL" ] && [ -n "${URL:-}" ] && [ -n "${SCHEMA:-}" ] \
    && psql "$URL" -qc "DROP SCHEMA IF EXISTS \"$SCHEMA\" CASCADE" >/dev/null 2>&1

  [ -n "$PG_URL" ] && scripts/pg.sh stop "$PG_URL" >/dev/null 2>&1 || true
  [ -n "${ES_BENCH_KEEP:-}" ] && { cp "$WORK/nginx/logs/error.log" /tmp/es-http-bench-error.log 2>/dev/null; }
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "bench/http.sh: interrupted" >&2; exit 130' INT TERM

URL=${ES_DATABASE_URL:-${ES_TEST_DATABASE_URL:-}}
if [ -z "$URL" ]; then
  PG_URL=$(ES_PG_FSYNC=${ES_PG_FSYNC:-on} scripts/pg.sh start | tail -n 1)
  URL=$PG_URL
fi
SCHEMA=es_http_bench_$$

# schema + seed orders (admin creates them for one customer)
export LUA_PATH="$ROOT/lua/?.lua;$ROOT/lua/?/init.lua;$ROOT/examples/?.lua;;"
export LUA_CPATH="$ROOT/build/lua5.4/?.so;;"
U=$URL S=$SCHEMA N=$ORDERS OUT=$WORK/ids lua5.4 -e '
  local es = require "eventsourcing"
  local service = require "orders.service"
  local store = assert(es.open(os.getenv("U"), { schema = os.getenv("S") }))
  assert(service.migrate(store))
  local svc = service.new(store)
  local f = assert(io.open(os.getenv("OUT"), "w"))
  for i = 1, tonumber(os.getenv("N")) do
    local id = assert(svc.create_order({ customer_id = "bench" }, { user = "bench" }))
    for k = 1, 3 do
      assert(svc.add_item { order_id = id, product_id = "seed" .. k, quantity = k, unit_price = 100 * k })
    end
    f:write(id, "\n")
  end
  f:close()'

# The service as nginx.sh starts it: one worker process, 16 pool threads.
# Until round 8 the bench ran a worker per CPU with 2, then 4 threads
# each (while a command cost three round trips and a fold, 2 threads per
# worker served it best on 2 cores). A cached command is one round trip
# now, mostly waiting for its commit's flush, and on 2 cores that nginx
# shares with PostgreSQL and wrk a second event loop only adds wake-ups:
# alternated runs of POST /orders/{id}/items at 32 connections (round 9,
# fsync on) gave 2,731 and 2,760 req/s with 1 x 16 (p99 19.9 and 19.4
# ms), 2,693 and 2,415 with 1 x 8 (17.7, 19.6), 2,515 and 2,443 with
# 2 x 4 (26.3, 23.5); at 2 connections p99 2.7-4.7 ms in all three.
PORT=${PORT:-$((20000 + $$ % 30000))}
# start_nginx [STATE_CACHE]: the service, with its shared state cache
# unless STATE_CACHE is off
start_nginx() {
  PORT=$PORT ES_HTTP_DATABASE_URL=$URL ES_HTTP_SCHEMA=$SCHEMA ES_HTTP_STATE_CACHE=${1:-on} \
    ES_HTTP_WORKERS=${ES_HTTP_WORKERS:-1} ES_HTTP_THREADS=${ES_HTTP_THREADS:-16} \
    examples/orders/http/nginx.sh start "$WORK/nginx" >/dev/null
}
start_nginx
BASE=http://127.0.0.1:$PORT

cat >"$WORK/orders.lua" <<'LUA'
-- wrk script: GET or POST over many orders (ids from $IDS), bearer token.
local ids = {}
for line in io.lines(os.getenv("IDS")) do ids[#ids + 1] = line end
local mode, token = os.getenv("MODE"), os.getenv("TOKEN")
local counter, tid = 0, 0
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init() tid = tonumber(wrk.thread:get("tid")) or 0 end
local headers = { ["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json" }
-- Each wrk thread writes its own share of the orders (ids whose index is
-- tid modulo the number of threads): two threads stepping through one list
-- at a fixed offset would otherwise hit the same order again and again,
-- and the conflicts retried (409 after 3) would measure the bench's own
-- collisions. Within a thread the connections in flight take distinct ids.
local mine
function request()
  counter = counter + 1
  if not mine then
    local n = tonumber(os.getenv("WRK_THREADS")) or 2
    mine = {}
    for i = 1, #ids do
      if i % n == tid % n then mine[#mine + 1] = ids[i] end
    end
    if #mine == 0 then mine = ids end
  end
  local id = mine[(counter * 7919) % #mine + 1]
  if mode == "get" then
    return wrk.format("GET", "/orders/" .. id, headers)
  end
  -- a new product each time: business rules never reject
  local body = ('{"product_id":"t%d-%d","quantity":1,"unit_price":100}'):format(tid, counter)
  return wrk.format("POST", "/orders/" .. id .. "/items", headers, body)
end
LUA

# CPU seconds (user + system) of nginx's workers and of PostgreSQL's
# processes (backends and background writers), from /proc: the server's
# cost per request, beside wrk's own (which shares the 2 cores).
NGINX_PIDS='' PG_PIDS=''
ticks() {
  local sum=0 pid f
  for pid in "$@"; do
    f=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    f=${f##*) }   # fields after the command name; utime, stime are 12th, 13th here
    # shellcheck disable=SC2086
    set -- $f
    sum=$((sum + ${12} + ${13}))
  done
  echo "$sum"
}
# Where nginx's CPU goes and how often its threads and PostgreSQL's
# processes were switched out (voluntary: waiting for a reply, a request
# or a task; involuntary: preempted), summed over pids: "loop_ticks
# pool_ticks switches". A worker's own thread (tid = pid) runs the event
# loop; its other threads are the pool's.
task_stats() {
  local loop=0 pool=0 sw=0 pid t f v n
  for pid in "$@"; do
    for t in /proc/"$pid"/task/*; do
      f=$(cat "$t/stat" 2>/dev/null) || continue
      f=${f##*) }
      # shellcheck disable=SC2086
      set -- $f
      if [ "${t##*/}" = "$pid" ]; then loop=$((loop + ${12} + ${13})); else pool=$((pool + ${12} + ${13})); fi
      while read -r v n; do
        case $v in voluntary_ctxt_switches:|nonvoluntary_ctxt_switches:) sw=$((sw + n)) ;; esac
      done <"$t/status" 2>/dev/null || true
    done
  done
  echo "$loop $pool $sw"
}
pg_pids() { psql "$URL" -Atqc "SELECT pid FROM pg_stat_activity" 2>/dev/null | tr '\n' ' '; }
server_pids() {
  local master
  master=$(<"$WORK/nginx/logs/nginx.pid")
  NGINX_PIDS=$(ps -o pid= --ppid "$master" | tr '\n' ' ')
  PG_PIDS=$(pg_pids)
}

# Bench-only phase breakdown (ES_HTTP_TIMINGS=1): the mean of every
# Server-Timing phase over the access log of one run, in ms.
phases() {
  local name=$1
  awk -v name="$name" '
    match($0, /"timing":"[^"]*"/) {
      t = substr($0, RSTART + 10, RLENGTH - 11)
      if (t == "") next
      n++
      k = split(t, parts, /, /)
      for (i = 1; i <= k; i++) {
        split(parts[i], kv, /;dur=/)
        sum[kv[1]] += kv[2]
      }
      if (match($0, /"duration":[0-9.]+/)) total += substr($0, RSTART + 11, RLENGTH - 11) * 1000
    }
    END {
      if (n == 0) exit
      for (p in sum) printf "%s_phase_%s %.3f ms\n", name, p, sum[p] / n
      printf "%s_phase_nginx_request_time %.3f ms\n", name, total / n
    }' "$WORK/nginx/logs/access.log" | sort
}

# run NAME CONNECTIONS wrk-args...: prints rps, p50, p99 (ms), and the
# server's CPU per request (and wrk's, for honesty on 2 shared cores)
run() {
  local name=$1 conns=$2; shift 2
  local threads=2 out n0 p0 n1 p1
  : >"$WORK/nginx/logs/access.log"
  # PostgreSQL's processes now; those that start during the run (the
  # event loop's probe connections) are added after it, all their CPU
  # being the run's
  PG_PIDS=$(pg_pids)
  # shellcheck disable=SC2086  # lists of pids, split on purpose
  n0=$(ticks $NGINX_PIDS) p0=$(ticks $PG_PIDS)
  local ns0 ps0 ns1 ps1
  # shellcheck disable=SC2086
  ns0=$(task_stats $NGINX_PIDS) ps0=$(task_stats $PG_PIDS)
  out=$( { TIMEFORMAT='wrk_cpu %U %S'; time wrk -t"$threads" -c"$conns" -d"${SECS}s" --latency "$@"; } 2>&1) \
    || { echo "bench/http.sh: wrk failed: $out" >&2; return 1; }
  # shellcheck disable=SC2086,SC2046
  PG_PIDS=$(printf '%s\n' $PG_PIDS $(pg_pids) | sort -u | tr '\n' ' ')
  # shellcheck disable=SC2086
  n1=$(ticks $NGINX_PIDS) p1=$(ticks $PG_PIDS)
  # shellcheck disable=SC2086
  ns1=$(task_stats $NGINX_PIDS) ps1=$(task_stats $PG_PIDS)
  if [ "${ES_HTTP_TIMINGS:-}" = 1 ]; then
    # the access log's lines wait in nginx's buffer up to its flush interval
    sleep "${ES_HTTP_ACCESS_LOG_FLUSH:-1}.5"
    phases "$name"
  fi
  # shellcheck disable=SC2086
  set -- $ns0 $ns1 $ps0 $ps1
  awk -v name="$name" -v nginx=$((n1 - n0)) -v pg=$((p1 - p0)) -v hz="$(getconf CLK_TCK)" \
      -v loop=$(($4 - $1)) -v pool=$(($5 - $2)) -v nsw=$(($6 - $3)) -v psw=$((${12} - $9)) '
    function ms(v) {
      if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
      if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
      if (v ~ /s$/)  return substr(v, 1, length(v) - 1) * 1000
      return v
    }
    /Requests\/sec:/ { rps = $2 }
    /^ +50%/ { p50 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    /Non-2xx or 3xx responses:/ { bad = $5 }
    /Socket errors:/ { sockerr = $0 }
    /^wrk_cpu / { wrk = $2 + $3 }
    /requests in / { n = $1 }
    END {
      printf "%s_rps %.0f req/s\n", name, rps
      printf "%s_p50 %.3f ms\n", name, p50
      printf "%s_p99 %.3f ms\n", name, p99
      printf "%s_non2xx %d responses\n", name, bad
      if (n > 0) {
        printf "%s_cpu_nginx %.1f us/req\n", name, nginx / hz / n * 1e6
        printf "%s_cpu_nginx_loop %.1f us/req\n", name, loop / hz / n * 1e6
        printf "%s_cpu_nginx_pool %.1f us/req\n", name, pool / hz / n * 1e6
        printf "%s_switches_nginx %.1f per req\n", name, nsw / n
        printf "%s_switches_pg %.1f per req\n", name, psw / n
        printf "%s_cpu_pg %.1f us/req\n", name, pg / hz / n * 1e6
        printf "%s_cpu_wrk %.1f us/req\n", name, wrk / n * 1e6
      }
    }' <<<"$out"
}

export IDS=$WORK/ids TOKEN
# warm-up: every pool thread opens its connection, plans get cached
warm() {
  MODE=get wrk -t2 -c32 -d1s -s "$WORK/orders.lua" "$BASE" >/dev/null 2>&1 || true
  server_pids
}
warm
# every GET before any POST, so both GET runs read orders of the same length
want() { [ -z "${ES_BENCH_ONLY:-}" ] || [[ ,$ES_BENCH_ONLY, == *,$1,* ]]; }
for c in ${ES_BENCH_CONNS:-2 32}; do
  want health && run "http_health_c$c" "$c" "$BASE/health"
  want get && MODE=get run "http_get_order_c$c" "$c" -s "$WORK/orders.lua" "$BASE"
done
# No Lua error may escape a handler: nginx.sh empties the error log at each
# start, so it is read before each stop and at the end.
check_log() {
  if grep -q 'runtime error' "$WORK/nginx/logs/error.log"; then
    echo "bench/http.sh: Lua errors in the nginx log:" >&2
    grep 'runtime error' "$WORK/nginx/logs/error.log" | head -5 >&2
    exit 1
  fi
}
restart_nginx() {
  check_log
  examples/orders/http/nginx.sh stop "$WORK/nginx" >/dev/null
  start_nginx "$1"
  warm
  # one second of commands, as the runs send them: every order's state is
  # in the (new, empty) state cache before a run that measures it
  MODE=post wrk -t2 -c32 -d1s -s "$WORK/orders.lua" "$BASE" >/dev/null 2>&1 || true
}
# Commands at each connection count: first with every command reading and
# folding its order's stream (ES_HTTP_STATE_CACHE=off, the named
# alternative: `*_nocache` lines), then as the service runs, with the
# shared state cache. nginx is restarted before each, and sent a second of
# commands first (both ways alike). Orders grow by a few items in each
# run, so the cached run reads the longer ones.
for c in ${ES_BENCH_CONNS:-2 32}; do
  want post || continue
  restart_nginx off
  MODE=post run "http_post_item_c${c}_nocache" "$c" -s "$WORK/orders.lua" "$BASE"
  restart_nginx on
  MODE=post run "http_post_item_c$c" "$c" -s "$WORK/orders.lua" "$BASE"
done
check_log
