#!/usr/bin/env bash
# make check-memory: every Lua 5.4 spec against the ASan+UBSan build
# (build/asan/eventsourcing/core.so) on its own throwaway PostgreSQL.
#
# Lua runs in a tiny Lua 5.4 host built here with -fsanitize=address,undefined
# (build/asan/lua5.4-asan, linked to Debian's liblua5.4), so the sanitizer
# runtime is loaded without LD_PRELOAD and child processes (psql, sh, nginx)
# are not instrumented (psql deadlocks under a preloaded libasan). Specs that
# spawn Lua children get the same host through helpers.lua_cmd() ($ES_LUA).
# Sanitizer reports go to files (log_path) and are counted, printed, and make
# the run fail; leaks are checked at exit, with scripts/lsan.supp suppressing
# only system-library initialisation (never core.so, liblua or libpq frames).
#
#   scripts/check-memory.sh [SPEC...]
# Last lines: `memory errors: N` then `N passed, N failed`.
set -uo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ES_ROOT" || exit 1

MODULE=${ES_ASAN_MODULE:-build/asan/eventsourcing/core.so}
[ -f "$MODULE" ] || es_die "$MODULE missing: run make build/asan/eventsourcing/core.so (make check-memory does)"
HOST=build/asan/lua5.4-asan
CC=${CC:-cc}

build_host() {
  local src; src=$(mktemp -d "${TMPDIR:-/tmp}/es-host.XXXXXX")
  cat >"$src/host.c" <<'CSRC'
/* Minimal Lua 5.4 host built with ASan+UBSan by scripts/check-memory.sh.
 * Usage: host [-e chunk | -l mod]... [script [args...]] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <lua.h>
#include <lualib.h>
#include <lauxlib.h>

/* lua_close() dlcloses C modules before LeakSanitizer runs at exit, which
 * leaves leak stacks as "<unknown module>": keep modules mapped instead
 * (exported with -rdynamic, this overrides libc's dlclose for liblua). */
int dlclose(void *handle);
int dlclose(void *handle) { (void)handle; return 0; }

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
    msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

static int docall(lua_State *L, int narg) {
  int base = lua_gettop(L) - narg, status;
  lua_pushcfunction(L, traceback);
  lua_insert(L, base);
  status = lua_pcall(L, narg, 0, base);
  lua_remove(L, base);
  return status;
}

int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  int i = 1, status = LUA_OK;
  if (!L) return 1;
  luaL_openlibs(L);
  for (; i < argc && status == LUA_OK; i++) {
    if (strcmp(argv[i], "-e") == 0 && i + 1 < argc) {
      status = luaL_loadstring(L, argv[++i]);
      if (status == LUA_OK) status = docall(L, 0);
    } else if (strcmp(argv[i], "-l") == 0 && i + 1 < argc) {
      lua_getglobal(L, "require");
      lua_pushstring(L, argv[++i]);
      status = docall(L, 1);
    } else break;
  }
  if (status == LUA_OK && i < argc) {
    int script = i, n = argc - script - 1, j;
    lua_createtable(L, n, script + 1);
    for (j = 0; j < argc; j++) { lua_pushstring(L, argv[j]); lua_rawseti(L, -2, j - script); }
    lua_setglobal(L, "arg");
    status = luaL_loadfile(L, argv[script]);
    if (status == LUA_OK) {
      for (j = script + 1; j < argc; j++) lua_pushstring(L, argv[j]);
      status = docall(L, n);
    }
  }
  if (status != LUA_OK) fprintf(stderr, "%s\n", lua_tostring(L, -1));
  lua_close(L);
  return status == LUA_OK ? EXIT_SUCCESS : EXIT_FAILURE;
}
CSRC
  # shellcheck disable=SC2046
  "$CC" -std=c99 -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -rdynamic \
    $(pkg-config --cflags lua5.4) "$src/host.c" -o "$HOST.tmp" $(pkg-config --libs lua5.4) \
    && mv "$HOST.tmp" "$HOST"
  local rc=$?
  rm -rf "$src"
  return $rc
}
if [ ! -x "$HOST" ] || [ "$HOST" -ot "${BASH_SOURCE[0]}" ]; then
  mkdir -p "$(dirname "$HOST")"
  build_host || es_die "could not build the ASan Lua host ($HOST)"
fi

specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(spec)

LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/es-asan.XXXXXX")
PG_URL= PGB_URL=
cleanup() {
  if [ -n "$PGB_URL" ]; then scripts/pgbouncer.sh stop "$PGB_URL" || true; PGB_URL=; fi
  if [ -n "$PG_URL" ]; then scripts/pg.sh stop "$PG_URL" || true; PG_URL=; fi
  rm -rf "$LOGDIR"
}
trap cleanup EXIT
trap es_on_interrupt INT TERM

if [ -z "${ES_TEST_DATABASE_URL:-}" ]; then
  PG_URL=$(scripts/pg.sh start) || es_die "could not start a throwaway PostgreSQL (scripts/pg.sh start)"
  export ES_TEST_DATABASE_URL=$PG_URL
  echo "check-memory: throwaway PostgreSQL at $PG_URL"
  # spec/09_pooler_spec.lua's PgBouncer (as scripts/test.sh starts it)
  if [ -z "${ES_TEST_POOLER_URL:-}" ] && PGB_URL=$(scripts/pgbouncer.sh start "$PG_URL"); then
    export ES_TEST_POOLER_URL=$PGB_URL
  fi
fi

export ES_LUA=$ES_ROOT/$HOST
# intercept_tls_get_addr=0: Debian 12's libasan (GCC 12) guesses that a
# dynamic TLS block whose address is 16 bytes past a page boundary carries
# glibc 2.19's header, and records the two words before it as that block's
# start and size. Since glibc 2.25 those blocks come from malloc (ASan's), so
# one lands there by chance (about 1 in 256 for core.so's 24-byte block of
# uuid.c, more often for libuuid's): LeakSanitizer's tracer then scans a
# garbage range and dies ("Tracer caught signal 11", no finding). Spec 26's
# first writer process did so every run: with LSAN_OPTIONS=verbosity=2 it logs
# `{0x5,0x0} => 0x603000018010` (module 5 is core.so) then `glibc >=2.19
# suspected; tls={0xd39 0x1800001102}`. LLVM fixed the guess in 2023 (LLVM
# 17, "Fix tls_get_addr handling for glibc >=2.25"; google/sanitizers#1322).
# Nothing is left unscanned: on glibc >= 2.25 the interceptor only ever gives
# a block size 0 or that garbage; the blocks are heap chunks reachable from
# each thread's DTV, whose pointer sits in the thread descriptor LSan scans.
export ASAN_OPTIONS="detect_leaks=1:intercept_tls_get_addr=0:halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=1:check_initialization_order=1:strict_string_checks=1:fast_unwind_on_malloc=0:log_path=$LOGDIR/asan${ES_ASAN_EXTRA:+:$ES_ASAN_EXTRA}"
export LSAN_OPTIONS="suppressions=$ES_ROOT/scripts/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$LOGDIR/ubsan"
ES_LUA_CPATH="$(dirname "$(dirname "$MODULE")")/?.so"
export ES_LUA_CPATH

# One busted process per spec file: a sanitizer abort stops only that file,
# and the log says which file it was.
files=()
for s in "${specs[@]}"; do
  if [ -d "$s" ]; then
    while IFS= read -r f; do files+=("$f"); done < <(find "$s" -name '*_spec.lua' | sort)
  else
    files+=("$s")
  fi
done
t0=$SECONDS passed=0 failed=0
for f in "${files[@]}"; do
  ES_SUITE_LOG=$LOGDIR/output.log es_run_suite asan "lua5.4+asan $f" "$f"
  # UBSan inside an ASan build reports on stderr, not to log_path: count
  # reports from the output too (copied where the log_path files go).
  if grep -qE "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:" "$LOGDIR/output.log"; then
    mv "$LOGDIR/output.log" "$LOGDIR/stderr"
  else
    rm -f "$LOGDIR/output.log"
  fi
  passed=$((passed + ES_PASSED)) failed=$((failed + ES_FAILED))
  if compgen -G "$LOGDIR/*" >/dev/null; then
    mkdir -p "$LOGDIR/by-spec"
    for r in "$LOGDIR"/*; do [ -f "$r" ] && mv "$r" "$LOGDIR/by-spec/$(basename "$f" .lua).$(basename "$r")"; done
  fi
done

reports=0
for r in "$LOGDIR"/by-spec/*; do
  [ -f "$r" ] || continue
  n=$(grep -cE "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:" "$r")
  [ "$n" -gt 0 ] || n=1   # any sanitizer log is a problem worth a look
  reports=$((reports + n))
  echo "----- sanitizer report: $(basename "$r") -----"
  case $r in *.stderr) grep -E -A12 "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:" "$r" ;; *) cat "$r" ;; esac
done

echo
echo "lua5.4+asan: $passed passed, $failed failed, ${#files[@]} spec files ($((SECONDS - t0))s)"
[ $((passed + failed)) -gt 0 ] || { echo "check-memory: no test ran" >&2; failed=1; }
echo "memory errors: $reports"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$reports" -eq 0 ]
