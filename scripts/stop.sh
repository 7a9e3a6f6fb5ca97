#!/usr/bin/env bash
# make stop: stop what scripts/serve.sh started for $PORT (default 8080):
# nginx, the supervised processes (workflows, projector) and the throwaway
# PostgreSQL; none of them is left running (spec/36_serve_spec.lua).
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ES_ROOT" || exit 1

PORT=${PORT:-8080}
DIR=${ES_SERVE_DIR:-/tmp/es-serve.$PORT}
STATE=$DIR/state
if [ ! -f "$STATE" ]; then es_log "stop: nothing started from $DIR"; exit 0; fi
PG_URL='' SUPERVISED='' NGINX_PREFIX=
# shellcheck disable=SC1090
. "$STATE"

if [ -n "$NGINX_PREFIX" ]; then
  examples/orders/http/nginx.sh stop "$NGINX_PREFIX" && es_log "stop: nginx stopped"
fi
# each supervisor leads its own process group (setsid): stop the group,
# which holds the supervisor and its child
# (kill -0 -PGID: is any process of the group left?)
for pid in $SUPERVISED; do
  kill -0 -- "-$pid" 2>/dev/null || continue
  kill -TERM -- "-$pid" 2>/dev/null
  for _ in $(seq 1 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  es_log "stop: supervised process group $pid stopped"
done
if [ -n "$PG_URL" ]; then
  scripts/pg.sh stop "$PG_URL" && es_log "stop: PostgreSQL stopped"
fi
rm -f "$STATE"
