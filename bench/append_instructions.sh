#!/usr/bin/env bash
# bench/append_instructions.sh - server instructions per append, counted by
# callgrind: the same figure on a busy machine as on a quiet one, so two
# variants of the append path can be told apart by a few percent (CPU time
# of a backend sways by 10% and more here while others work).
#
#   bench/append_instructions.sh [TARGET...]      (default: all four)
#
# Targets, each a DO loop of appends in a single-user backend (postgres
# --single) run under callgrind, a new stream per one-event append:
#   es      append() with one event, as bench/pgbench_append.sql calls it
#   es_one  the library's one-event INSERT (pg_events.c, PG_APPEND_ONE),
#           as bench/pgbench_append_one.sql sends it
#   es_100  append() with 100 events to 10 streams in turn at their exact
#           versions (figure per event)
#   events_100  the same rows, made the same way, by a plain INSERT from
#           the arrays (no version read, no checks, no function): what
#           append() adds to a 100-event batch is es_100 minus this
# Prints `append_instructions_<target> <n> per append|per event`. Each target
# runs twice (N and N + ES_CG_MORE appends, from the same copy of a store of
# 20,000 events) and the difference is divided, so start-up and the
# server's own set-up drop out. The loop's own work (ids by
# gen_random_uuid(), arrays built in SQL) is counted too, as in the bench's
# server_cpu lines. Needs valgrind and PostgreSQL's server binaries; build
# first (make). About a minute per target.
set -euo pipefail
cd "$(dirname "$0")/.."

PGBIN=${ES_PG_BIN:-/usr/lib/postgresql/15/bin}
MORE=${ES_CG_MORE:-1000}
SCHEMA=es_cg
command -v valgrind >/dev/null || { echo "append_instructions: needs valgrind" >&2; exit 2; }
[ -f build/lua5.4/eventsourcing/core.so ] || { echo "append_instructions: run make first" >&2; exit 2; }
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# a store of 20,000 events with fresh statistics, made by this build
url=$(ES_PG_PORT=5477 scripts/pg.sh start | tail -n1)
dir=${url#*host=}; dir=${dir%% *}
# the server is stopped once the store is made; stop it here too if that
# step failed, then remove everything
# (|| true: errexit holds inside the trap, and the server is usually
# stopped already, so pg_ctl fails and would make the script's status 1)
trap 'as_owner "$PGBIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
ES_CG_URL=$url LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/lua5.4/?.so;;" lua5.4 -e '
  local es = require "eventsourcing"
  local s = assert(es.open(os.getenv("ES_CG_URL"), { schema = "'$SCHEMA'" }))
  assert(s:migrate())
  for i = 1, 20000 do
    assert(s:append("Seed-" .. (i % 2000), { type = "Seeded", data = { n = 1 } }))
  end
  assert(s:query("ANALYZE '$SCHEMA'.events"))
  s:close()'
as_owner "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null

. bench/append_calls.sh
# the 100 rows of an es_100 / events_100 loop turn, as four arrays
ROWS_100="SELECT array_agg(('0190' || lpad(to_hex(i), 8, '0') || '-7000-8000-'
                  || lpad(to_hex(g), 12, '0'))::uuid), array_agg('Ticked'::text),
                array_agg(('{\"n\": ' || g || ', \"note\": \"hello\"}')::json),
                array_agg('{}'::json)
            INTO ids, types, d, m FROM generate_series(1, 100) AS g"
loop_body() {
  case $1 in
    es|es_one) append_call "$1" "$SCHEMA" ;;
    es_100) echo "$ROWS_100;
          SELECT o_status INTO st FROM $SCHEMA.append('Cpu-' || (i % 10),
            (i / 10) * 100, false, ids, types, d, m);
          IF st <> 0 THEN RAISE EXCEPTION 'append status %', st; END IF" ;;
    events_100) echo "$ROWS_100;
          INSERT INTO $SCHEMA.events (id, stream, version, type, data, metadata, category)
          SELECT u.id, 'Cpu-' || (i % 10), (i / 10) * 100 + u.ord, u.type, u.data, u.meta, 'Cpu'
            FROM unnest(ids, types, d, m) WITH ORDINALITY AS u(id, type, data, meta, ord)" ;;
    *) echo "append_instructions: unknown target $1" >&2; return 2 ;;
  esac
}

# instructions TARGET N : the whole single-user backend's, N appends
instructions() {
  local work; work=$(mktemp -d "$dir/cg.XXXXXX")
  cp -a "$dir/data" "$work/data"
  [ "$(id -u)" = 0 ] && chown -R postgres: "$work"
  # -j: a statement ends at a semicolon followed by an empty line
  printf 'SET synchronous_commit = off;\n\nDO $$ DECLARE s text; st int;
    lo bigint := 0; hi bigint := 9223372036854775807; pos bigint; ver bigint;
    at timestamptz; after uuid; ids uuid[]; types text[]; d json[]; m json[];
  BEGIN FOR i IN 0..%d LOOP %s; COMMIT; END LOOP; END $$;\n\n' \
    "$(($2 - 1))" "$(loop_body "$1")" >"$work/in.sql"
  as_owner valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
    "$PGBIN/postgres" --single -j -D "$work/data" -c fsync=off \
    -c full_page_writes=off eventsourcing_test <"$work/in.sql" \
    >"$work/out" 2>"$work/err" || { cat "$work/err" >&2; return 1; }
  if grep -q ERROR "$work/out"; then grep ERROR "$work/out" >&2; return 1; fi
  awk '/^summary:/ { print $2 }' "$work/cg.out"
  rm -rf "$work"
}

for t in "${@:-es es_one es_100 events_100}"; do
  for target in $t; do
    loop_body "$target" >/dev/null
    a=$(instructions "$target" 100)
    b=$(instructions "$target" $((100 + MORE)))
    if [ "$target" = es_100 ] || [ "$target" = events_100 ]; then
      echo "append_instructions_$target $(( (b - a) / (MORE * 100) )) per event"
    else
      echo "append_instructions_$target $(( (b - a) / MORE )) per append"
    fi
  done
done
