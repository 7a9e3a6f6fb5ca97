# Shared shell helpers for scripts/*.sh (sourced, not executed).
# shellcheck shell=bash

# shellcheck disable=SC2034  # used by the scripts that source this file
ES_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Module path for specs: the library, spec helpers, and the examples
# (specs require "orders.order" etc. from examples/).
ES_LPATH="lua/?.lua;lua/?/init.lua;spec/?.lua;examples/?.lua;examples/?/init.lua"

es_log()  { printf '%s\n' "$*" >&2; }
es_die()  { printf 'error: %s\n' "$*" >&2; exit 1; }
es_is_root() { [ "$(id -u)" = 0 ]; }

# es_busted FLAVOUR ARGS... : run busted under lua5.4 or luajit directly
# ($ES_LUA overrides the interpreter: check-memory's ASan host).
# Debian's `busted` starts with `#!/usr/bin/env lua`, and `lua` may be Lua 5.1
# (lua-check pulls in lua5.1), so call the interpreter explicitly.
# --ignore-lua stops busted re-executing itself if a .busted task sets `lua`.
es_busted() {
  local flavour=$1; shift
  local interp task
  case $flavour in
    lua5.4) interp=lua5.4 task=default ;;
    asan)   interp=lua5.4 task=asan ;;
    luajit) interp=luajit task=luajit ;;
    *) es_die "unknown flavour $flavour" ;;
  esac
  # busted prepends .busted's lpath/cpath to package.path/cpath: pass them
  # explicitly so a task can never load the other flavour's module.
  local cpath=${ES_LUA_CPATH:-build/$flavour/?.so}
  LUA_PATH="$ES_LPATH;;" \
  LUA_CPATH="$cpath;;" \
  # a hanging spec must end the run, not hang it: after ES_TEST_TIMEOUT
  # seconds busted is stopped and, with no summary written, counts as failed
  ES_LUA_FLAVOUR=$flavour \
    timeout -k 10 "${ES_TEST_TIMEOUT:-1800}" \
    "${ES_LUA:-$interp}" "$(command -v busted)" --ignore-lua --run="$task" \
      --lpath="$ES_LPATH" --cpath="$cpath" "$@"
}

# es_on_interrupt: INT/TERM trap for scripts running suites: stop the
# running busted, then exit (the EXIT trap stops the cluster).
ES_CHILD=
es_on_interrupt() {
  trap - INT TERM
  echo "interrupted" >&2
  if [ -n "${ES_CHILD:-}" ]; then
    kill -TERM "$ES_CHILD" 2>/dev/null; wait "$ES_CHILD" 2>/dev/null
  fi
  [ -z "${ES_SUMFILE:-}" ] || rm -f "$ES_SUMFILE"
  exit 130
}

# es_run_suite FLAVOUR LABEL SPECS... : run the specs once under FLAVOUR and
# leave counts in ES_PASSED / ES_FAILED (errors count as failed).
# The counts come from spec/summary_output.lua, which writes them to a file
# (not stdout, so tests that print can not corrupt it). If busted dies before
# writing it (crash, signal, handler error), the run counts as one failure.
es_run_suite() {
  local flavour=$1 label=$2; shift 2
  local sumfile rc=0
  sumfile=$(mktemp "${TMPDIR:-/tmp}/es-summary.XXXXXX")
  ES_SUMFILE=$sumfile
  : >"$sumfile"
  echo "=== $label: busted ($flavour) $*"
  # In the background + wait, so a Ctrl-C reaches our INT trap at once
  # (bash defers traps while a foreground child runs, and skips them when the
  # child survives the signal).
  # With ES_SUITE_LOG set, busted's output goes to that file (shown after
  # the run) so the caller can scan it, e.g. for sanitizer reports.
  if [ -n "${ES_SUITE_LOG:-}" ]; then
    ES_TEST_SUMMARY_FILE=$sumfile es_busted "$flavour" -o spec/summary_output.lua "$@" >"$ES_SUITE_LOG" 2>&1 &
  else
    ES_TEST_SUMMARY_FILE=$sumfile es_busted "$flavour" -o spec/summary_output.lua "$@" &
  fi
  ES_CHILD=$!
  wait "$ES_CHILD" || rc=$?
  ES_CHILD=
  [ -z "${ES_SUITE_LOG:-}" ] || cat "$ES_SUITE_LOG"
  ES_PASSED=0 ES_FAILED=0
  local p f e pend
  if grep -q '^done$' "$sumfile"; then
    p=$(sed -n 's/^passed //p' "$sumfile"); f=$(sed -n 's/^failed //p' "$sumfile")
    e=$(sed -n 's/^errors //p' "$sumfile"); pend=$(sed -n 's/^pending //p' "$sumfile")
    ES_PASSED=$p ES_FAILED=$((f + e))
    echo "--- $label: $p passed, $f failed, $e errors, $pend pending (busted exit $rc)"
    if [ "$ES_FAILED" -gt 0 ]; then
      echo "--- $label: failing tests:"
      grep '^FAIL	' "$sumfile" | cut -f2- | sed 's/	/ -> /; s/^/    /'
    fi
    if [ "$ES_FAILED" = 0 ] && [ "$rc" != 0 ]; then
      echo "--- $label: busted exited $rc with no failure recorded: counting 1 failure"
      ES_FAILED=1
    fi
  else
    echo; echo "--- $label: busted exited $rc without a summary (crash or load error): counting 1 failure"
    ES_FAILED=1
  fi
  rm -f "$sumfile"
  ES_SUMFILE=
}
