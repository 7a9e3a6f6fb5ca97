#!/usr/bin/env bash
# Start or stop one nginx instance of the order service's HTTP API from a
# self-contained prefix folder (conf, logs, pid, temp files all inside it).
#
#   examples/orders/http/nginx.sh start PREFIX   (settings from the environment)
#   examples/orders/http/nginx.sh stop  PREFIX
#
# Settings: PORT (default 8080), ES_HTTP_DATABASE_URL (required),
# ES_HTTP_SCHEMA (optional), ES_HTTP_TOKENS (default tokens.json next to
# this script), ES_HTTP_THREADS (thread pool size, default 16),
# ES_HTTP_WORKERS (worker processes, default 1), ES_HTTP_MAX_RETRIES (conflict
# retries per command, default 3), ES_HTTP_ACCESS_LOG_FLUSH (seconds the
# access log's lines may wait in a 64 KiB buffer, default 1; 0 writes each
# line at once), ES_HTTP_READ_MODEL (inline | projector:
# who updates rm_orders, default inline), ES_HTTP_USER (the user nginx's
# workers run as when started by root; default: the checkout's owner).
# The schema must be migrated already. Used by scripts/serve.sh and
# spec/30_http_spec.lua.
set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
NGINX=${NGINX:-/usr/sbin/nginx}

die() { echo "nginx.sh: $*" >&2; exit 1; }

# a value for a quoted nginx string: escape backslashes and double quotes
q() { local s=${1//\\/\\\\}; printf '%s' "${s//\"/\\\"}"; }

# Started by root, nginx runs its workers as `nobody`, which cannot read a
# checkout under a 0700 home (/root, or /home/USER on Debian 12): every
# request would fail with "module not found". So the workers run as the
# owner of the checkout, who can read it; as any other user, nginx keeps
# its workers as that user (and ignores `user`). Sets WORKER_USER and
# USER_LINE (the directive, or nothing).
worker_user() {
  if [ "$(id -u)" = 0 ]; then
    WORKER_USER=${ES_HTTP_USER:-$(stat -c %U "$ROOT")}
    if [ "$WORKER_USER" = UNKNOWN ] || ! id -u "$WORKER_USER" >/dev/null 2>&1; then
      die "the checkout $ROOT belongs to no known user: set ES_HTTP_USER"
    fi
    USER_LINE="user $WORKER_USER $(id -gn "$WORKER_USER");"
  else
    WORKER_USER=$(id -un) USER_LINE=""
  fi
}

# as_worker CMD...: run CMD as the workers' user
as_worker() {
  if [ "$(id -u)" = 0 ] && [ "$WORKER_USER" != root ]; then
    runuser -u "$WORKER_USER" -- "$@"
  else
    "$@"
  fi
}

# Fail now, with the file named, rather than answer every request with 500.
check_readable() {
  local f
  for f in "$ROOT/build/luajit/eventsourcing/core.so" "$ROOT/lua/eventsourcing/init.lua" \
           "$HERE/api.lua" "$HERE/worker.lua" "$HERE/openapi.json" "$ROOT/examples/orders/service.lua" "$1"; do
    as_worker test -r "$f" || die "nginx's workers run as $WORKER_USER, who cannot read $f \
(check the modes of it and of every folder above it, or set ES_HTTP_USER)"
  done
}

# the access_log directive's buffering (ES_HTTP_ACCESS_LOG_FLUSH seconds)
access_log_buffer() {
  local flush=${ES_HTTP_ACCESS_LOG_FLUSH:-1}
  [[ $flush =~ ^[0-9]+$ ]] || die "ES_HTTP_ACCESS_LOG_FLUSH must be whole seconds, got '$flush'"
  if [ "$flush" -gt 0 ]; then printf 'buffer=64k flush=%ss' "$flush"; fi
}

start() {
  local prefix=$1
  local port=${PORT:-8080}
  [[ $port =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
  [ -n "${ES_HTTP_DATABASE_URL:-}" ] || die "ES_HTTP_DATABASE_URL is not set"
  [ -f "$ROOT/build/luajit/eventsourcing/core.so" ] || die "build/luajit/eventsourcing/core.so missing (make)"
  local tokens=${ES_HTTP_TOKENS:-$HERE/tokens.json}
  [ -r "$tokens" ] || die "tokens file $tokens not readable"
  tokens=$(cd "$(dirname "$tokens")" && pwd)/$(basename "$tokens")
  local logbuf
  logbuf=$(access_log_buffer)
  worker_user
  check_readable "$tokens"
  mkdir -p "$prefix/conf" "$prefix/logs" "$prefix/tmp"
  : >"$prefix/logs/error.log"
  chmod 755 "$prefix"
  local conf
  conf=$(<"$HERE/nginx.conf")
  conf=${conf//@ROOT@/$ROOT}
  conf=${conf//@PREFIX@/$prefix}
  conf=${conf//@PORT@/$port}
  conf=${conf//@THREADS@/${ES_HTTP_THREADS:-16}}
  conf=${conf//@WORKERS@/${ES_HTTP_WORKERS:-1}}
  conf=${conf//@USER@/$USER_LINE}
  conf=${conf//@ENV_DATABASE_URL@/$(q "$ES_HTTP_DATABASE_URL")}
  conf=${conf//@ENV_SCHEMA@/$(q "${ES_HTTP_SCHEMA:-}")}
  conf=${conf//@ENV_TOKENS@/$(q "$tokens")}
  conf=${conf//@ENV_MAX_RETRIES@/$(q "${ES_HTTP_MAX_RETRIES:-3}")}
  conf=${conf//@ENV_READ_MODEL@/$(q "${ES_HTTP_READ_MODEL:-inline}")}
  conf=${conf//@ACCESS_LOG_BUFFER@/$logbuf}
  printf '%s\n' "$conf" >"$prefix/conf/nginx.conf"
  "$NGINX" -q -t -p "$prefix" -c "$prefix/conf/nginx.conf" -e "$prefix/logs/error.log" \
    || die "configuration test failed ($prefix/conf/nginx.conf)"
  "$NGINX" -p "$prefix" -c "$prefix/conf/nginx.conf" -e "$prefix/logs/error.log" \
    || die "nginx did not start; see $prefix/logs/error.log"
  # ready when /health answers
  local i
  for i in $(seq 1 100); do
    if curl -fsS -o /dev/null "http://127.0.0.1:$port/health" 2>/dev/null; then
      # resty.core and friends report load problems only in the log
      if grep -E '\[(alert|emerg)\]|failed to load' "$prefix/logs/error.log" >&2; then
        stop "$prefix"; die "nginx reported errors (above)"
      fi
      # /health is static: ask the Lua handler too (no token: its 401)
      local code
      code=$(curl -sS -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/orders/ready-check" 2>/dev/null)
      if [ "$code" != 401 ]; then
        grep -E '\[error\]' "$prefix/logs/error.log" | tail -n 5 >&2 || true
        stop "$prefix"; die "the Lua handler answered $code instead of 401 (error log above)"
      fi
      return 0
    fi
    sleep 0.05
  done
  tail -n 20 "$prefix/logs/error.log" >&2 || true
  stop "$prefix" || true
  die "nginx on port $port did not answer /health"
}

stop() {
  local prefix=$1 pid=
  [ -f "$prefix/logs/nginx.pid" ] && pid=$(<"$prefix/logs/nginx.pid")
  [ -n "$pid" ] || return 0
  "$NGINX" -q -p "$prefix" -c "$prefix/conf/nginx.conf" -e "$prefix/logs/error.log" -s stop 2>/dev/null \
    || kill -TERM "$pid" 2>/dev/null || true
  local i
  for i in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null || true
}

case ${1:-} in
  start) [ -n "${2:-}" ] || die "usage: $0 start PREFIX"; start "$(realpath -m "$2")" ;;
  stop)  [ -n "${2:-}" ] || die "usage: $0 stop PREFIX"; stop "$(realpath -m "$2")" ;;
  *) die "usage: $0 start|stop PREFIX" ;;
esac
