#!/usr/bin/env bash
# Run every spec under Lua 5.4 and LuaJIT against a throwaway PostgreSQL
# (or $ES_TEST_DATABASE_URL), then print `N passed, N failed` as the last line.
#
#   scripts/test.sh [SPEC...]        (make test SPEC=spec/03_store_spec.lua)
#   ES_TEST_FLAVOURS="lua5.4"        only one flavour
#   ES_TEST_OUTPUT=utfTerminal|TAP   terminal output style (default plainTerminal)
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

PG_URL=
cleanup() {
  if [ -n "$PG_URL" ]; then scripts/pg.sh stop "$PG_URL" || true; PG_URL=; fi
}
trap cleanup EXIT
trap es_on_interrupt INT TERM

if [ -z "${ES_TEST_DATABASE_URL:-}" ]; then
  t0=$SECONDS
  PG_URL=$(scripts/pg.sh start) || es_die "could not start a throwaway PostgreSQL (scripts/pg.sh start)"
  export ES_TEST_DATABASE_URL=$PG_URL
  echo "test: throwaway PostgreSQL at $PG_URL ($((SECONDS - t0))s)"
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

cleanup
echo
printf '%s\n' "${lines[@]}"
if [ $((total_p + total_f)) -eq 0 ]; then
  echo "test: no test ran" >&2
  total_f=1
fi
echo "$total_p passed, $total_f failed"
[ "$total_f" -eq 0 ]
