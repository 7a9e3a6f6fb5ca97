#!/usr/bin/env bash
# make stop: stop what scripts/serve.sh started for $PORT (default 8080):
# nginx, the projector supervisor, and the throwaway PostgreSQL.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ES_ROOT"

PORT=${PORT:-8080}
DIR=${ES_SERVE_DIR:-/tmp/es-serve.$PORT}
STATE=$DIR/state
if [ ! -f "$STATE" ]; then es_log "stop: nothing started from $DIR"; exit 0; fi
PG_URL= PROJECTOR_PID= NGINX_PREFIX=
# shellcheck disable=SC1090
. "$STATE"

if [ -n "$NGINX_PREFIX" ]; then
  examples/orders/http/nginx.sh stop "$NGINX_PREFIX" && es_log "stop: nginx stopped"
fi
if [ -n "$PROJECTOR_PID" ] && kill -0 "$PROJECTOR_PID" 2>/dev/null; then
  # the supervisor leads its own process group (setsid): stop the group
  kill -TERM -- "-$PROJECTOR_PID" 2>/dev/null || kill -TERM "$PROJECTOR_PID" 2>/dev/null
  for _ in $(seq 1 50); do kill -0 "$PROJECTOR_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$PROJECTOR_PID" 2>/dev/null || true
  es_log "stop: projector stopped"
fi
if [ -n "$PG_URL" ]; then
  scripts/pg.sh stop "$PG_URL" && es_log "stop: PostgreSQL stopped"
fi
rm -f "$STATE"
