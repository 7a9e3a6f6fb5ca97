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
#   BENCH_APPEND_ROUNDS=2            rounds of alternated append phases (mean)
#   BENCH_ONLY="append fold"         only these sections (default: all)
#   BENCH_ROUNDS=5                   rounds of fold / codec (best is kept)
#   BENCH_CMD_SECS=5                 length of each commands phase
#   BENCH_EVENTS=1000000             events replayed by the rebuild bench
#   BENCH_NAIVE=100000               events the naive UPDATE loop applies
#   BENCH_WORKERS="2"                worker counts of the rebuilds after the 1-worker one
#   BENCH_GROUP_MEMBERS="1 2 4"      group sizes of the group catch-up bench
#   BENCH_LAG_N=300                  lag samples (head polling; a third for 100 ms polling)
#   BENCH_HTTP_SECS=5                length of each wrk run
#
# Benchmarks:
#   codec    bench/codec.lua (es.json against lua-cjson), lua5.4 and luajit
#   append   against Message DB (bench/message_db.sh installs it from npm into
#            a temporary folder and a database of its own; skipped, and said
#            so, without npm) and plain prepared INSERTs into a bare table with
#            the same columns and keys (bench/bare.sql), phases alternated:
#            pgbench calling append() / the library's one-event INSERT /
#            write_message / INSERT at 2, 8 and 32 clients
#            (bench/pgbench_append.sql, pgbench_append_one.sql,
#            pgbench_write_message.sql, pgbench_insert.sql) beside three
#            floors (pgbench_insert_events.sql: a plain INSERT into a copy of
#            the events table; pgbench_insert_pk.sql: a table with only a
#            primary key; pgbench_commit.sql: one WAL record and the
#            commit's flush); server CPU and
#            WAL bytes per append from the backend's schedstat and the WAL
#            insert position; bench/append.lua processes (2 and 8, one event per
#            append) against the same loop calling write_message; 100 events
#            per append against a 100-row INSERT (pgbench_insert100.sql) and
#            the floor the events table's shape sets (a plain 100-row INSERT
#            into a copy of it, pgbench_insert100_events.sql), and the
#            server CPU and WAL per event of each (server_cpu_batch);
#            client and backend CPU per event from Lua (bench/append_cpu.lua)
#            and server instructions per append under callgrind
#            (bench/append_instructions.sh, when valgrind is installed)
#   fold     bench/fold.lua, store:fold against lua-sql-postgres + lua-cjson,
#            and Message DB's get_stream_messages of the same stream on the
#            server alone (bench/pgbench_get_stream_messages.sql) beside our
#            stream read on the server alone (pgbench_read_stream.sql)
#   commands bench/commands.lua, AddItem end to end, 2 client processes, 10
#            and 1,000 prior events, without snapshots against snapshot_every
#            = 100, lua5.4 and luajit
#   rebuild  bench/rebuild.lua, rebuild of rm_orders from 1,000,000 events
#            with 1 and BENCH_WORKERS worker processes, against a naive
#            UPDATE-per-event loop, lua5.4 and luajit
#   group    bench/group_catchup.lua, catch-up of a read model over
#            BENCH_GROUP_EVENTS (1,000,000) events by a consumer group of 1, 2
#            and 4 member processes, against one plain projector, lua5.4
#   lag      bench/lag.lua, append -> read-model row visible with a live
#            projector polling the log's head every 5 ms (no NOTIFY) against
#            100 ms polling, idle and with 4 writers, lua5.4 and luajit
#   http     bench/http.sh, wrk on nginx: GET /orders/{id} and POST
#            /orders/{id}/items at 2 and 32 connections, against GET /health,
#            with the CPU per request of nginx, PostgreSQL and wrk;
#            ES_HTTP_TIMINGS=1 adds the mean time per phase of a request;
#            then bench/command_cpu.lua, the same command without HTTP one
#            after the other (BENCH_HTTP_COMMANDS, 3,000): CPU per command of
#            the pool thread's code and of PostgreSQL, against round 3's
#            append (ids looked up), luajit and lua5.4; and
#            bench/command_instructions.sh, its instructions under
#            callgrind (LuaJIT's interpreter), at 3 and 15 item lines
#   pooler   bench/pooler.sh, appends and folds at 8 and 32 clients: named
#            prepared statements straight to PostgreSQL against unnamed ones
#            (pooler = "transaction") straight and through PgBouncer
#            (transaction pooling), lua5.4; BENCH_POOLER_SECS=3 per phase
#   trips    bench/round_trips.sh, round trips to PostgreSQL per add_item
#            command (what POST /orders/{id}/items runs), counted as libpq's
#            sendto() calls under strace
#   rmwrite  bench/rm_write.lua, PostgreSQL's CPU per transaction that
#            writes rm_orders rows: one row by typed parameters and five
#            without deletes by an upsert, against round 5's statement (a
#            DELETE CTE and json_populate_recordset); BENCH_RMWRITE_TX
#            (3,000) per variant and round, lua5.4
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ES_ROOT" || exit 1

SECS=${BENCH_SECS:-6}
APPEND_ROUNDS=${BENCH_APPEND_ROUNDS:-2}
CLIENTS=2
OUT=$(mktemp -d "${TMPDIR:-/tmp}/es-bench.XXXXXX")
RESULTS=$OUT/results
: >"$RESULTS"

PG_URL=
cleanup() {
  # Message DB's database on a server that is not ours (its role
  # message_store, made by its installer, stays)
  if [ -z "$PG_URL" ] && [ -n "${MDB_URL:-}" ]; then
    bench/message_db.sh remove "$URL" "$MDB_DB" >/dev/null 2>&1 || true
  fi
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
median() { sort -n | awk '{ a[NR] = $1 } END { if (NR) print a[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "nan" }'; }

psql_q() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 "$URL" "$@"; }

FAILED=()
# want SECTION : true when BENCH_ONLY is unset or names it
want() { [ -z "${BENCH_ONLY:-}" ] || [[ " $BENCH_ONLY " == *" $1 "* ]]; }
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

# append_phase N SIZE TARGET : N bench/append.lua processes at once; prints
# the summed rate in events/s (run in $(...): returns non-zero on failure)
append_phase() {
  local n=$1 size=$2 target=$3 url=$URL pids=() c
  [ "$target" = message_db ] && url=$MDB_URL
  rm -f "$OUT"/append.*
  for c in $(seq 1 "$n"); do
    run_lua lua5.4 bench/append.lua "$url" "$SCHEMA" "$c" "$size" "$SECS" "$target" \
      >"$OUT/append.$c" 2>&1 &
    pids+=($!)
  done
  local failed=0
  for c in "${pids[@]}"; do wait "$c" || failed=1; done
  if [ $failed = 1 ]; then cat "$OUT"/append.* >&2; return 1; fi
  cat "$OUT"/append.* | awk '{ rate += $2 / $4 } END { printf "%.0f", rate }'
}

# cpu_jiffies : "busy idle" clock ticks of all CPUs so far (/proc/stat;
# idle includes iowait)
cpu_jiffies() {
  awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat
}

# pgbench_phase FILE CLIENTS [TARGET] : prints tps (TARGET message_db: its
# database, search_path message_store). On stderr: the whole machine's CPU
# per transaction and the share of idle CPU during the run (/proc/stat):
# when the cores are busy throughout, a transaction's statement is only
# part of what it costs; the rest (pgbench, the protocol, the commit, WAL
# writes and flushes, the kernel's switches) is paid by every alternative.
pgbench_phase() {
  local url=$URL opts=${PGOPTIONS:-} j0 j1 tps
  if [ "${3:-}" = message_db ]; then url=$MDB_URL; opts="-c search_path=message_store,public"; fi
  sed -e "s/BENCH_SCHEMA/$BARE/g" "$1" >"$OUT/pgbench.sql"
  case $(basename "$1") in
    pgbench_append.sql|pgbench_append_one.sql) sed -i "s/$BARE/$SCHEMA/g" "$OUT/pgbench.sql" ;;
  esac
  j0=$(cpu_jiffies)
  PGOPTIONS=$opts pgbench -n -M prepared -c "$2" -j "$(( $2 < 2 ? $2 : 2 ))" -T "$SECS" \
    -f "$OUT/pgbench.sql" "$url" >"$OUT/pgbench.out" 2>&1 || { cat "$OUT/pgbench.out" >&2; return 1; }
  j1=$(cpu_jiffies)
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$OUT/pgbench.out" | head -1)
  [ -n "$tps" ] && awk -v a="$j0" -v b="$j1" -v t="$tps" -v s="$SECS" -v hz="$(getconf CLK_TCK)" '
    BEGIN { split(a, x, " "); split(b, y, " "); busy = y[1] - x[1]; idle = y[2] - x[2]
            if (t > 0 && busy + idle > 0)
              printf "    (machine CPU %.0f us a transaction, %.0f%% idle)\n",
                busy / hz * 1e6 / (t * s), 100 * idle / (busy + idle) }' >&2
  echo "$tps"
}

# pgbench_events FILE CLIENTS SIZE : events/s of SIZE-row transactions
pgbench_events() {
  local tps; tps=$(pgbench_phase "$1" "$2") && [ -n "$tps" ] || return 1
  awk -v t="$tps" -v n="$3" 'BEGIN { printf "%.0f", t * n }'
}

# server_cpu TARGET N : "CPU_US WAL_BYTES" per single-event append, N
# appends each in its own transaction (a DO loop that commits). CPU is read
# from the backend's /proc/self/schedstat: time on a CPU only, so unlike
# the rates above it hardly moves with the load of a shared machine. WAL is
# pg_current_wal_insert_lsn() before and after (commit records included;
# another session writing at the same time would add to it: run alone).
# The loop runs with synchronous_commit off, so the flush is not in the
# figure (it is the same for every target). Needs a superuser on a Linux
# server. Targets: es (append()), es_one (the library's one-statement
# INSERT for one event, pg_events.c PG_APPEND_ONE), message_db
# (write_message), bare_insert, insert_pk, commit (the floors of
# bench/bare.sql, pgbench_insert_pk.sql and pgbench_commit.sql).
. bench/append_calls.sh
server_cpu() {
  local target=$1 n=$2 url=$URL pre="" call
  local payload="'{\"n\": 1, \"note\": \"hello\"}'"
  case $target in
    es|es_one) call=$(append_call "$target" "$SCHEMA") ;;
    message_db) url=$MDB_URL; pre="SET search_path = message_store, public;"
      call="PERFORM write_message(gen_random_uuid()::text, 'cpu-' || i || '-' || random(),
          'Ticked', $payload, '{}')" ;;
    bare_insert) call="INSERT INTO $BARE.bare (id, stream, version, type, data, metadata)
          VALUES (gen_random_uuid(), 'Cpu-' || i, nextval('$BARE.bare_version'), 'Ticked',
                  $payload, '{}')" ;;
    insert_pk) call="INSERT INTO $BARE.pk (id, stream, version, type, data, metadata)
          VALUES (gen_random_uuid(), 'Cpu-' || i, 1, 'Ticked', $payload, '{}')" ;;
    commit) call="PERFORM pg_logical_emit_message(true, 'es_bench', '')" ;;
  esac
  psql -X -q -At -v ON_ERROR_STOP=1 "$url" 2>&1 <<SQL
$pre
SET synchronous_commit = off;
SELECT split_part(pg_read_file('/proc/self/schedstat'), ' ', 1) AS s0,
       pg_current_wal_insert_lsn() AS w0 \gset
DO \$\$ DECLARE s text; lo bigint := 0; hi bigint := 9223372036854775807; pos bigint;
  ver bigint; at timestamptz; after uuid;
BEGIN FOR i IN 1..$n LOOP $call; COMMIT; END LOOP; END \$\$;
SELECT round((split_part(pg_read_file('/proc/self/schedstat'), ' ', 1)::bigint - :s0) / 1000.0 / $n, 1)
       || ' ' || round(pg_wal_lsn_diff(pg_current_wal_insert_lsn(), :'w0') / $n);
SQL
}

# server_cpu_batch TARGET N : "CPU_US WAL_BYTES" per event of N 100-event
# transactions, read as server_cpu reads them. es: append() with the four
# arrays (ids ordered in time like the library's UUID v7: a counter behind
# the clock) to 10 new streams in turn at their exact versions, as
# bench/append.lua appends (names as short as its); bare_insert: bench/pgbench_insert100.sql's
# INSERT into the bare table (random ids, as there); events_insert: es's
# rows, made the same way, by a plain INSERT from the arrays into the copy
# of the events table (bench/pgbench_insert100_events.sql's), no version
# read, no checks, no function. All include making the rows' values on
# the server (about 1.3 us an event here).
server_cpu_batch() {
  local target=$1 n=$2 call rows
  rows="SELECT array_agg((lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0')
                || '7' || lpad(to_hex(i * 100 + g), 19, '0'))::uuid), array_agg('Ticked'::text),
                array_agg(('{\"n\": ' || g || ', \"note\": \"hello\"}')::json), array_agg('{}'::json)
            INTO ids, types, d, m FROM generate_series(1, 100) AS g;
          s := 'Cpu' || tag || '-' || (i % 10)"
  case $target in
    es) call="$rows;
          SELECT o_status INTO st FROM $SCHEMA.append(s, (i / 10) * 100, false, ids, types, d, m);
          IF st <> 0 THEN RAISE EXCEPTION 'append status %', st; END IF" ;;
    events_insert) call="$rows;
          INSERT INTO $BARE.events (id, stream, version, type, data, metadata, category)
          SELECT u.id, s, (i / 10) * 100 + u.ord, u.type, u.data, u.meta, split_part(s, '-', 1)
            FROM unnest(ids, types, d, m) WITH ORDINALITY AS u(id, type, data, meta, ord)" ;;
    bare_insert) call="INSERT INTO $BARE.bare (id, stream, version, type, data, metadata)
          SELECT gen_random_uuid(), 'CpuBatch' || i, nextval('$BARE.bare_version'), 'Ticked',
                 ('{\"n\": ' || g || ', \"note\": \"hello\"}')::json, '{}'
            FROM generate_series(1, 100) AS g" ;;
  esac
  psql -X -q -At -v ON_ERROR_STOP=1 "$URL" 2>&1 <<SQL
SET synchronous_commit = off;
SELECT split_part(pg_read_file('/proc/self/schedstat'), ' ', 1) AS s0,
       pg_current_wal_insert_lsn() AS w0 \gset
DO \$\$ DECLARE s text; tag text := to_hex((random() * 1e9)::int); st int;
  ids uuid[]; types text[]; d json[]; m json[];
BEGIN FOR i IN 0..$((n - 1)) LOOP $call; COMMIT; END LOOP; END \$\$;
SELECT round((split_part(pg_read_file('/proc/self/schedstat'), ' ', 1)::bigint - :s0) / 1000.0 / ($n * 100), 2)
       || ' ' || round(pg_wal_lsn_diff(pg_current_wal_insert_lsn(), :'w0') / ($n * 100));
SQL
}

# alternate NAME ROUNDS label:command... : runs the phases in turn, ROUNDS
# times (the order rotating each round, so no variant always runs after the
# same one), and records NAME_<label> as the mean of its rounds; a phase
# that fails is reported and its label left out
alternate() {
  local name=$1 rounds=$2 r i j n label v; shift 2
  local -a labels=() cmds=() sums=() fails=()
  for v in "$@"; do labels+=("${v%%:*}"); cmds+=("${v#*:}"); sums+=(0); fails+=(0); done
  n=${#labels[@]}
  for r in $(seq 1 "$rounds"); do
    for j in $(seq 0 $((n - 1))); do
      i=$(( (j + r - 1) % n ))
      [ "${fails[$i]}" = 1 ] && continue
      if v=$(eval "${cmds[$i]}") && [ -n "$v" ]; then
        sums[$i]=$(awk -v a="${sums[$i]}" -v b="$v" 'BEGIN { print a + b }')
        echo "  round $r ${labels[$i]}: $v"
      else
        fails[$i]=1; fail "$name ${labels[$i]}"
      fi
    done
  done
  for i in $(seq 0 $((n - 1))); do
    [ "${fails[$i]}" = 1 ] && continue
    record "${name}_${labels[$i]} $(awk -v s="${sums[$i]}" -v r="$rounds" 'BEGIN { printf "%.0f", s / r }') events/s"
  done
}

# record_ratio NAME A B [OUT] : NAME_A / NAME_B when both were recorded, as
# OUT (default NAME_ratio_B)
record_ratio() {
  local a b; a=$(value_of "${1}_$2"); b=$(value_of "${1}_$3")
  [ -n "$a" ] && [ -n "$b" ] && record "${4:-${1}_ratio_$3} $(ratio "$a" "$b") x"
}

# ---- codec ---------------------------------------------------------------
if want codec; then
section "codec (bench/codec.lua, es.json against lua-cjson)"
for f in lua5.4 luajit; do
  bench_run "codec $f" "" run_lua "$f" bench/codec.lua
done
fi

# ---- append ---------------------------------------------------------------
# The store's schema and Message DB serve append and fold.
MDB_URL=
MDB_DB=es_bench_mdb_$$
if want append || want fold; then
BENCH_URL=$URL BENCH_SCHEMA=$SCHEMA run_lua lua5.4 -e '
  local es = require "eventsourcing"
  local s = assert(es.open(os.getenv("BENCH_URL"), { schema = os.getenv("BENCH_SCHEMA") }))
  assert(s:migrate())' || es_die "migrate failed"

# Message DB, when npm can fetch it: a database of its own on this server
if MDB_URL=$(bench/message_db.sh install "$URL" "$OUT/message_db" "$MDB_DB" 2>"$OUT/mdb.err" | tail -1) \
   && [ -n "$MDB_URL" ]; then
  echo "bench: Message DB $(cat "$OUT/message_db/package/database/VERSION.txt" 2>/dev/null) installed in database $MDB_DB"
else
  rc=$?
  echo "bench: Message DB SKIPPED (not measured): $(cat "$OUT/mdb.err")"
  [ "$rc" = 3 ] || fail "Message DB install"
  MDB_URL=
fi
fi

if want append; then
section "append (${SECS}s per phase, $APPEND_ROUNDS rounds alternated; append() against Message DB's write_message and a bare INSERT)"

# Both stores start with 20,000 events in 2,000 streams and fresh
# statistics, as a store that has run a while has (autovacuum's ANALYZE
# comes after 10% of a table changes, never within a short bench). Message
# DB needs them: its stream_version() (called by every write_message) keeps
# a sequential-scan plan when its session starts on a table never analyzed,
# 0.7 ms a call at 26,000 rows against 0.03 ms after ANALYZE, measured here.
seed_stores() {
  psql_q -c "DO \$\$ BEGIN FOR i IN 1..20000 LOOP PERFORM $SCHEMA.append('Seed-' || (i % 2000),
      -1, false, ARRAY[gen_random_uuid()], ARRAY['Seeded'], ARRAY['{\"n\": 1}'::json],
      ARRAY['{}'::json]); END LOOP; END \$\$" -c "ANALYZE $SCHEMA.events" || return 1
  [ -z "$MDB_URL" ] && return 0
  PGOPTIONS="-c search_path=message_store,public -c client_min_messages=warning" \
    psql -X -q -v ON_ERROR_STOP=1 "$MDB_URL" -c "DO \$\$ BEGIN FOR i IN 1..20000 LOOP
      PERFORM write_message(gen_random_uuid()::text, 'seed-' || (i % 2000), 'Seeded',
      '{\"n\": 1}', '{}'); END LOOP; END \$\$" -c "ANALYZE messages"
}

if ! seed_stores; then
  fail "append (could not seed the stores)"
elif sed "s/BENCH_SCHEMA/$BARE/g" bench/bare.sql | psql_q >/dev/null &&
     psql_q -c "CREATE TABLE $BARE.events (LIKE $SCHEMA.events INCLUDING ALL)" >/dev/null; then
  # server side: pgbench calls append() itself (es) and sends the
  # library's one-event statement (es_one), one event per transaction,
  # against write_message, the bare INSERT and three floors: a plain INSERT
  # into the copy of the events table (its four indexes, no checks), an
  # INSERT into a table with only a primary key, and a commit that writes
  # one WAL record
  for c in 2 8 32; do
    phases=("es:pgbench_phase bench/pgbench_append.sql $c"
            "es_one:pgbench_phase bench/pgbench_append_one.sql $c"
            "bare_insert:pgbench_phase bench/pgbench_insert.sql $c"
            "events_insert:pgbench_phase bench/pgbench_insert_events.sql $c"
            "insert_pk:pgbench_phase bench/pgbench_insert_pk.sql $c"
            "commit:pgbench_phase bench/pgbench_commit.sql $c")
    [ -n "$MDB_URL" ] && phases+=("message_db:pgbench_phase bench/pgbench_write_message.sql $c message_db")
    alternate "append_server_1_c$c" "$APPEND_ROUNDS" "${phases[@]}"
    record_ratio "append_server_1_c$c" es message_db
    for l in es_one bare_insert events_insert insert_pk commit; do
      record_ratio "append_server_1_c$c" "$l" message_db "append_server_1_c${c}_${l}_ratio_message_db"
    done
    record_ratio "append_server_1_c$c" es_one bare_insert "append_server_1_c${c}_es_one_ratio_bare_insert"
    record_ratio "append_server_1_c$c" es_one events_insert "append_server_1_c${c}_es_one_ratio_events_insert"
  done
  # server CPU and WAL per append, the median of 5 rounds of 2,000
  # (alternated)
  if [ "$(psql_q -At -c "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")" = t ] \
     && [ -r /proc/self/schedstat ]; then
    targets="es es_one bare_insert insert_pk commit"
    [ -n "$MDB_URL" ] && targets="$targets message_db"
    for _ in 1 2 3 4 5; do
      for t in $targets; do
        v=$(server_cpu "$t" 2000 | tail -1)
        if [[ $v =~ ^[0-9.]+\ [0-9]+$ ]]; then echo "$t $v" >>"$OUT/cpu"; else fail "server cpu $t: $v"; fi
      done
    done
    for t in $targets; do
      v=$(awk -v t="$t" '$1 == t { print $2 }' "$OUT/cpu" | median)
      [ -n "$v" ] && record "append_server_cpu_$t $v us"
      v=$(awk -v t="$t" '$1 == t { print $3 }' "$OUT/cpu" | median)
      [ -n "$v" ] && record "append_server_wal_$t $v bytes"
    done
    for t in es es_one; do
      a=$(value_of "append_server_cpu_$t"); b=$(value_of append_server_cpu_message_db)
      [ -n "$a" ] && [ -n "$b" ] && record "append_server_cpu_${t}_ratio_message_db $(ratio "$b" "$a") x"
    done
  else
    echo "bench: server CPU per append SKIPPED (needs a superuser and /proc/self/schedstat)"
  fi
  # from Lua: bench/append.lua processes, one event per append
  for c in 2 8; do
    phases=("es:append_phase $c 1 es")
    [ -n "$MDB_URL" ] && phases+=("message_db:append_phase $c 1 message_db")
    alternate "append_lua_1_c$c" "$APPEND_ROUNDS" "${phases[@]}"
    record_ratio "append_lua_1_c$c" es message_db
  done
  # 100 events per append (Message DB has no batch write: a bare INSERT of
  # 100 rows is the alternative; and the floor the events table's shape
  # sets, a plain 100-row INSERT into a copy of it)
  alternate "append_lua_100_c$CLIENTS" "$APPEND_ROUNDS" "es:append_phase $CLIENTS 100 es" \
    "pgbench_insert:pgbench_events bench/pgbench_insert100.sql $CLIENTS 100" \
    "events_insert:pgbench_events bench/pgbench_insert100_events.sql $CLIENTS 100"
  record_ratio "append_lua_100_c$CLIENTS" es pgbench_insert
  record_ratio "append_lua_100_c$CLIENTS" es events_insert
  # and the server's CPU and WAL per event of a 100-event transaction, the
  # median of 5 rounds of 200 (alternated): unlike the rates, steady on a
  # loaded machine
  if [ "$(psql_q -At -c "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")" = t ] \
     && [ -r /proc/self/schedstat ]; then
    for _ in 1 2 3 4 5; do
      for t in es bare_insert events_insert; do
        v=$(server_cpu_batch "$t" 200 | tail -1)
        if [[ $v =~ ^[0-9.]+\ [0-9]+$ ]]; then echo "$t $v" >>"$OUT/cpu100"; else fail "server cpu 100 $t: $v"; fi
      done
    done
    for t in es bare_insert events_insert; do
      v=$(awk -v t="$t" '$1 == t { print $2 }' "$OUT/cpu100" | median)
      [ -n "$v" ] && record "append_server_cpu_100_$t $v us/event"
      v=$(awk -v t="$t" '$1 == t { print $3 }' "$OUT/cpu100" | median)
      [ -n "$v" ] && record "append_server_wal_100_$t $v bytes/event"
    done
  fi
  # CPU per event of one Lua process appending (os.clock) and of its
  # backend (/proc/<pid>/schedstat, commits included), 1 and 100 events per
  # append (bench/append_cpu.lua)
  if [ -r /proc/self/schedstat ]; then
    for size in 1 100; do
      ES_BENCH_DATABASE_URL=$URL ES_BENCH_SIZE=$size ES_BENCH_APPENDS=$((size == 1 ? 3000 : 300)) \
        bench_run "append cpu $size" "" run_lua lua5.4 bench/append_cpu.lua "$SCHEMA"
    done
  fi
  # server instructions per append (callgrind on a single-user backend,
  # bench/append_instructions.sh): the one figure of this section that a
  # busy machine does not move
  if command -v valgrind >/dev/null; then
    bench_run "append instructions" "" bench/append_instructions.sh
  else
    echo "bench: append instructions SKIPPED (valgrind not installed)"
  fi
else
  fail "append (could not create the bare table)"
fi
fi

# ---- fold -----------------------------------------------------------------
if want fold; then
section "fold (100,000 events; store:fold against lua-sql-postgres + lua-cjson, and Message DB's get_stream_messages)"
for f in lua5.4 luajit; do
  bench_run "fold $f" "" run_lua "$f" bench/fold.lua "$URL" "$SCHEMA"
done
# Message DB reads the same stream on the server alone (pgbench discards
# the rows: no client decoding at all), best of BENCH_ROUNDS, with fresh
# statistics (without them its read of this stream was 2-3x slower here)
if [ -n "$MDB_URL" ]; then
  if PGOPTIONS="-c search_path=message_store,public -c client_min_messages=warning" \
     psql -X -q -v ON_ERROR_STOP=1 "$MDB_URL" -c "SELECT count(write_message(gen_random_uuid()::text,
       'fold-1', 'Ticked', json_build_object('n', g, 'note', 'hello', 'items',
       json_build_array(1, 2, 3))::jsonb, '{\"user\": \"u1\"}'))
       FROM generate_series(1, 100000) AS g" -c "ANALYZE messages" >/dev/null; then
    # and our stream read on the server alone too (rounds alternated), the
    # like-for-like line: the fold figures above include decoding in Lua
    sed "s/BENCH_SCHEMA/$SCHEMA/g" bench/pgbench_read_stream.sql >"$OUT/read_stream.sql"
    best=0 best_es=0
    for _ in $(seq 1 "${BENCH_ROUNDS:-5}"); do
      t=$(PGOPTIONS="-c search_path=message_store,public" pgbench -n -M prepared -c 1 -t 3 \
          -f bench/pgbench_get_stream_messages.sql "$MDB_URL" 2>&1 | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
      best=$(awk -v a="$best" -v b="${t:-0}" 'BEGIN { print (b > a) ? b : a }')
      t=$(pgbench -n -M prepared -c 1 -t 3 -f "$OUT/read_stream.sql" "$URL" 2>&1 \
          | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
      best_es=$(awk -v a="$best_es" -v b="${t:-0}" 'BEGIN { print (b > a) ? b : a }')
    done
    record "fold_message_db_get_stream_messages $(awk -v t="$best" 'BEGIN { printf "%.0f", t * 100000 }') events/s"
    record "fold_es_server_read $(awk -v t="$best_es" 'BEGIN { printf "%.0f", t * 100000 }') events/s"
    for f in lua5.4 luajit; do
      es_rate=$(value_of "fold_es_$f")
      [ -n "$es_rate" ] && record "fold_ratio_${f}_message_db $(ratio "$es_rate" "$(value_of fold_message_db_get_stream_messages)") x"
    done
    record_ratio fold es_server_read message_db_get_stream_messages fold_ratio_server_read_message_db
  else
    fail "fold (writing Message DB's stream)"
  fi
else
  echo "bench: Message DB SKIPPED for fold (not installed)"
fi
fi
psql_q -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" -c "DROP SCHEMA IF EXISTS $BARE CASCADE" >/dev/null 2>&1 || true
[ -n "$MDB_URL" ] && bench/message_db.sh remove "$URL" "$MDB_DB" >/dev/null 2>&1

# ---- commands -------------------------------------------------------------
if want commands; then
CMD_SECS=${BENCH_CMD_SECS:-5}
section "commands (AddItem end to end, $CLIENTS clients, ${CMD_SECS}s per phase; snapshots against none)"
for f in lua5.4 luajit; do
  bench_run "commands $f" "" env BENCH_SECS="$CMD_SECS" BENCH_CLIENTS=$CLIENTS \
    LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" LUA_CPATH="build/$f/?.so;;" \
    "$f" bench/commands.lua "$URL"
done
fi

# ---- rebuild --------------------------------------------------------------
if want rebuild; then
EVENTS=${BENCH_EVENTS:-1000000}
section "rebuild (rm_orders from $EVENTS events; against one UPDATE per event)"
for f in lua5.4 luajit; do
  bench_run "rebuild $f" "_$f" env ES_BENCH_DATABASE_URL="$URL" ES_BENCH_EVENTS="$EVENTS" \
    ES_BENCH_NAIVE="${BENCH_NAIVE:-100000}" ES_BENCH_WORKERS="${BENCH_WORKERS:-2}" \
    LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" LUA_CPATH="build/$f/?.so;;" \
    "$f" bench/rebuild.lua
done
fi

# ---- lag ------------------------------------------------------------------
if want lag; then
section "lag (append -> read-model row visible; 5 ms head polling against 100 ms polling, idle and with 4 writers)"
for f in lua5.4 luajit; do
  bench_run "lag $f" "_$f" env ES_BENCH_DATABASE_URL="$URL" ES_BENCH_LAG_N="${BENCH_LAG_N:-300}" \
    LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" LUA_CPATH="build/$f/?.so;;" \
    "$f" bench/lag.lua
done
fi

# ---- group catch-up --------------------------------------------------------
if want group; then
GROUP_EVENTS=${BENCH_GROUP_EVENTS:-1000000}
section "group catch-up ($GROUP_EVENTS events, 16 partitions, 1/2/4 member processes; against one plain projector)"
bench_run "group catch-up lua5.4" "" env ES_BENCH_DATABASE_URL="$URL" ES_BENCH_GROUP_EVENTS="$GROUP_EVENTS" \
  ES_BENCH_GROUP_MEMBERS="${BENCH_GROUP_MEMBERS:-1 2 4}" \
  LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" LUA_CPATH="build/lua5.4/?.so;;" \
  lua5.4 bench/group_catchup.lua
fi

# ---- http -----------------------------------------------------------------
if want http; then
section "http (wrk on nginx, ${BENCH_HTTP_SECS:-5}s per run; against GET /health)"
bench_run "http" "" env ES_DATABASE_URL="$URL" ES_BENCH_SECONDS="${BENCH_HTTP_SECS:-5}" bash bench/http.sh
bad=$(awk '$1 ~ /^http_.*_non2xx$/ && $2 > 0 { print $1 "=" $2 }' "$RESULTS" | tr '\n' ' ')
[ -n "$bad" ] && fail "http: non-2xx responses: $bad"
# the same command without HTTP, one after the other: CPU per command of
# the pool thread's code and of PostgreSQL, against round 3's append
for f in luajit lua5.4; do
  bench_run "http command cpu $f" "" env LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" \
    LUA_CPATH="build/$f/?.so;;" "$f" bench/command_cpu.lua "$URL" "${BENCH_HTTP_COMMANDS:-3000}"
done
# the same command's instructions (callgrind): the figure a busy machine
# does not move
if command -v valgrind >/dev/null; then
  bench_run "http command instructions" "" env ES_DATABASE_URL="$URL" bash bench/command_instructions.sh
else
  echo "bench: http command instructions SKIPPED (valgrind not installed)"
fi
fi

# ---- round trips ----------------------------------------------------------
if want trips; then
section "round trips to PostgreSQL per add_item command (sendto() calls under strace)"
bench_run "trips" "" env ES_DATABASE_URL="$URL" bash bench/round_trips.sh
fi

# ---- read model row writes ----------------------------------------------------
if want rmwrite; then
section "rmwrite (PostgreSQL's CPU per rm_orders write; typed one-row and no-delete upserts against round 5's statement)"
bench_run "rmwrite" "" env LUA_PATH="lua/?.lua;lua/?/init.lua;examples/?.lua;;" LUA_CPATH="build/lua5.4/?.so;;" \
  lua5.4 bench/rm_write.lua "$URL" "${BENCH_RMWRITE_TX:-3000}"
fi

if want pooler; then
section "pooler: appends and folds, prepared direct vs unnamed direct and through PgBouncer"
bench_run "pooler" "" bash bench/pooler.sh "$URL" "${BENCH_POOLER_SECS:-3}"
fi

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
