#!/usr/bin/env bash
# make serve: the order service over HTTP on nginx, with the projector.
#
#   make serve                 PORT=8081 make serve    make stop (same PORT)
#
# Installs missing Debian packages (scripts/deps.sh, as root), starts a
# throwaway PostgreSQL unless ES_DATABASE_URL is set (ES_SCHEMA: optional
# schema), migrates (events + read model tables), starts the order
# workflows (stock reservation, compensation, draft expiry) and, with
# ES_HTTP_READ_MODEL=projector, the projector, each under
# scripts/supervise.sh (restarted if it dies), then nginx on
# 127.0.0.1:$PORT. By default the service updates the read model inline,
# in each command's transaction. ES_HTTP_DRAFT_TTL: seconds before a
# draft order expires (default 86400).
# Everything lives in $ES_SERVE_DIR (default /tmp/es-serve.$PORT);
# scripts/stop.sh stops exactly what this started (the pids are in
# $ES_SERVE_DIR/state; the supervised children's in $ES_SERVE_DIR/run/).
# Tokens: examples/orders/http/tokens.json (ES_HTTP_TOKENS for another file).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ES_ROOT"

PORT=${PORT:-8080}
[[ $PORT =~ ^[0-9]+$ ]] || es_die "PORT must be a number"
DIR=${ES_SERVE_DIR:-/tmp/es-serve.$PORT}

if es_is_root; then scripts/deps.sh || es_die "scripts/deps.sh failed"; fi
[ -f build/luajit/eventsourcing/core.so ] && [ -f build/lua5.4/eventsourcing/core.so ] \
  || make -s all

if [ -f "$DIR/state" ]; then
  es_log "serve: an instance seems to run from $DIR; stopping it first"
  PORT=$PORT ES_SERVE_DIR=$DIR scripts/stop.sh || true
fi
mkdir -p "$DIR"; chmod 755 "$DIR"
STATE=$DIR/state
: >"$STATE"

fail() { es_log "serve: $*"; PORT=$PORT ES_SERVE_DIR=$DIR scripts/stop.sh || true; exit 1; }

# 1. PostgreSQL
if [ -n "${ES_DATABASE_URL:-}" ]; then
  URL=$ES_DATABASE_URL
else
  URL=$(scripts/pg.sh start | tail -n 1) || fail "could not start PostgreSQL"
  echo "PG_URL='$URL'" >>"$STATE"
fi
SCHEMA=${ES_SCHEMA:-}

# 2. migrate
export LUA_PATH="$ES_ROOT/lua/?.lua;$ES_ROOT/lua/?/init.lua;$ES_ROOT/examples/?.lua;;"
export LUA_CPATH="$ES_ROOT/build/lua5.4/?.so;;"
ES_HTTP_DATABASE_URL=$URL ES_HTTP_SCHEMA=$SCHEMA lua5.4 -e '
  local es = require "eventsourcing"
  local schema = os.getenv("ES_HTTP_SCHEMA")
  local s = assert(es.open(os.getenv("ES_HTTP_DATABASE_URL"),
    schema ~= "" and { schema = schema } or nil))
  -- the event store and the read model tables (rm_orders)
  local service = require "orders.service"
  assert(service.migrate(s))
  s:close()' || fail "migration failed"

# 3. the workflows and (optionally) the projector, each in its own process
# group (setsid) under a supervisor that restarts it. By default the
# service updates its read model inline (in each command's transaction:
# lists are never stale) and needs no projector; ES_HTTP_READ_MODEL=projector
# leaves rm_orders to the projector instead (never both: events would apply
# twice).
mkdir -p "$DIR/logs" "$DIR/run"
export ES_HTTP_READ_MODEL=${ES_HTTP_READ_MODEL:-inline}
supervised() {   # supervised NAME SCRIPT
  ES_HTTP_DATABASE_URL=$URL ES_HTTP_SCHEMA=$SCHEMA setsid scripts/supervise.sh "$1" \
    "$DIR/run/$1.pid" lua5.4 "$2" >>"$DIR/logs/$1.log" 2>&1 </dev/null &
  echo "SUPERVISED=\"\${SUPERVISED:-} $!\"" >>"$STATE"
  es_log "serve: $1 running (log $DIR/logs/$1.log)"
}
supervised workflows examples/orders/http/workflows.lua
if [ "$ES_HTTP_READ_MODEL" = projector ]; then
  supervised projector examples/orders/http/projector.lua
else
  es_log "serve: read model updated inline by the service (ES_HTTP_READ_MODEL=projector for a projector process)"
fi

# 4. nginx
PORT=$PORT ES_HTTP_DATABASE_URL=$URL ES_HTTP_SCHEMA=$SCHEMA \
  examples/orders/http/nginx.sh start "$DIR/nginx" || fail "nginx did not start"
echo "NGINX_PREFIX='$DIR/nginx'" >>"$STATE"

cat <<MSG
serve: order service on http://127.0.0.1:$PORT  (database: $URL${SCHEMA:+, schema $SCHEMA})
serve: logs in $DIR/nginx/logs and $DIR/logs; stop with: PORT=$PORT make stop
serve: the API: http://127.0.0.1:$PORT/openapi.json; metrics: http://127.0.0.1:$PORT/metrics
serve: tokens in ${ES_HTTP_TOKENS:-examples/orders/http/tokens.json}, e.g.
  curl -s -X POST http://127.0.0.1:$PORT/orders -H 'Authorization: Bearer alice-token-0123456789' -d '{}'
MSG
