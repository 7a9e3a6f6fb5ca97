#!/usr/bin/env bash
# Run every spec under Lua 5.4 and LuaJIT against a throwaway PostgreSQL
# (or $ES_TEST_DATABASE_URL), then print `N passed, N failed` as the last line.
#
#   scripts/test.sh [SPEC...]        (make test SPEC=spec/03_store_spec.lua)
#   ES_TEST_FLAVOURS="lua5.4"        only one flavour
#   ES_TEST_OUTPUT=utfTerminal|TAP   terminal output style (default plainTerminal)
#   ES_TEST_POOLER=0                 skip the pooler pass (see below)
# With the throwaway PostgreSQL comes a throwaway PgBouncer in front of it
# (transaction pooling, 4 server sessions: scripts/pgbouncer.sh), exported
# as ES_TEST_POOLER_URL; after the flavours, a pooler pass runs the specs
# of POOLER_SPECS (those asked for) again under Lua 5.4 through it, the store
# opened with pooler=transaction, and counts them in the totals.
# The build must exist (make test depends on all). Exit status is non-zero when
# anything failed or errored, or when no test ran.
set -uo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ES_ROOT" || exit 1

if es_is_root; then scripts/deps.sh || es_die "scripts/deps.sh failed"; fi

flavours=${ES_TEST_FLAVOURS:-lua5.4 luajit}
for f in $flavours; do
  [ -f "build/$f/eventsourcing/core.so" ] || es_die "build/$f/eventsourcing/core.so missing: run make first"
done

specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(spec)

POOLER_SPECS=(spec/03_store_spec.lua spec/04_global_order_spec.lua spec/07_prefetch_spec.lua
  spec/09_pooler_spec.lua spec/20_read_model_spec.lua spec/21_projector_spec.lua spec/30_http_spec.lua
  spec/32_http_fast_get_spec.lua spec/11_inline_ahead_spec.lua
  spec/24_follower_spec.lua spec/25_follower_group_spec.lua spec/40_workflow_spec.lua)

PG_URL='' PGB_URL='' POOLER_SKIPPED=''
cleanup() {
  if [ -n "$PGB_URL" ]; then scripts/pgbouncer.sh stop "$PGB_URL" || true; PGB_URL=; fi
  if [ -n "$PG_URL" ]; then scripts/pg.sh stop "$PG_URL" || true; PG_URL=; fi
}
trap cleanup EXIT
trap es_on_interrupt INT TERM

if [ -z "${ES_TEST_DATABASE_URL:-}" ]; then
  t0=$SECONDS
  PG_URL=$(scripts/pg.sh start) || es_die "could not start a throwaway PostgreSQL (scripts/pg.sh start)"
  export ES_TEST_DATABASE_URL=$PG_URL
  echo "test: throwaway PostgreSQL at $PG_URL ($((SECONDS - t0))s)"
  if [ "${ES_TEST_POOLER:-1}" != 0 ] && [ -z "${ES_TEST_POOLER_URL:-}" ]; then
    if ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
      # said again in the totals: the pooler pass and spec 09 do not run
      POOLER_SKIPPED="skipped: pgbouncer is not installed (scripts/deps.sh)"
      echo "test: pooler pass $POOLER_SKIPPED"
    else
      PGB_URL=$(scripts/pgbouncer.sh start "$PG_URL") || es_die "could not start a throwaway PgBouncer (scripts/pgbouncer.sh start)"
      export ES_TEST_POOLER_URL=$PGB_URL
      echo "test: throwaway PgBouncer (transaction pooling) at $PGB_URL"
    fi
  fi
else
  echo "test: using ES_TEST_DATABASE_URL=$ES_TEST_DATABASE_URL"
fi

total_p=0 total_f=0 lines=()
for f in $flavours; do
  t0=$SECONDS
  es_run_suite "$f" "$f" "${specs[@]}"
  total_p=$((total_p + ES_PASSED)) total_f=$((total_f + ES_FAILED))
  lines+=("$f: $ES_PASSED passed, $ES_FAILED failed ($((SECONDS - t0))s)")
done

# The pooler pass: the asked-for specs of POOLER_SPECS through PgBouncer.
pooler_specs=()
for p in "${POOLER_SPECS[@]}"; do
  [ -f "$p" ] || continue    # a spec of a branch not merged yet
  for s in "${specs[@]}"; do
    if [ "$s" = spec ] || [ "$s" = "$p" ] || [ "$s" = "./$p" ]; then pooler_specs+=("$p"); break; fi
  done
done
pf=lua5.4
[[ " $flavours " == *" lua5.4 "* ]] || pf=${flavours%% *}
if [ "${ES_TEST_POOLER:-1}" != 0 ] && [ -n "${ES_TEST_POOLER_URL:-}" ] && [ ${#pooler_specs[@]} -gt 0 ]; then
  t0=$SECONDS
  direct=$ES_TEST_DATABASE_URL
  export ES_TEST_DIRECT_URL=$direct ES_TEST_POOLER=transaction
  export ES_TEST_DATABASE_URL="$ES_TEST_POOLER_URL pooler=transaction"
  es_run_suite "$pf" "pooler" "${pooler_specs[@]}"
  export ES_TEST_DATABASE_URL=$direct
  unset ES_TEST_DIRECT_URL ES_TEST_POOLER
  total_p=$((total_p + ES_PASSED)) total_f=$((total_f + ES_FAILED))
  lines+=("pooler ($pf, PgBouncer transaction pooling): $ES_PASSED passed, $ES_FAILED failed ($((SECONDS - t0))s)")
elif [ -n "$POOLER_SKIPPED" ]; then
  lines+=("pooler: $POOLER_SKIPPED")
fi

cleanup
echo
printf '%s\n' "${lines[@]}"
if [ $((total_p + total_f)) -eq 0 ]; then
  echo "test: no test ran" >&2
  total_f=1
fi
echo "$total_p passed, $total_f failed"
[ "$total_f" -eq 0 ]
