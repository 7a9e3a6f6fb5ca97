#!/usr/bin/env bash
# Message DB (the npm package @eventide/message-db), the named alternative of
# scripts/bench.sh, installed for one run and removed after it. Its code is
# fetched with npm into a temporary folder, never kept in this tree.
#
#   bench/message_db.sh install CONNINFO WORKDIR DBNAME
#       installs Message DB into a new database DBNAME on the server of
#       CONNINFO (key=value or postgresql:// form); prints that database's
#       conninfo as the last line. Exit 3, with the reason on stderr, when it
#       cannot be installed (no npm, no registry): the caller skips it.
#   bench/message_db.sh remove CONNINFO DBNAME
#
# MESSAGE_DB_VERSION (default 1.3.1) pins the npm package version.
set -uo pipefail

VERSION=${MESSAGE_DB_VERSION:-1.3.1}

# Sets PGHOST, PGPORT, PGUSER from a conninfo; fails on forms it cannot read.
server_env() {
  local ci=$1 kv k v
  unset PGHOST PGPORT PGUSER
  if [[ $ci =~ ^postgres(ql)?://(([^@/:]+)@)?([^/:?]*)(:([0-9]+))?(/|$) ]]; then
    [ -n "${BASH_REMATCH[3]}" ] && export PGUSER=${BASH_REMATCH[3]}
    [ -n "${BASH_REMATCH[4]}" ] && export PGHOST=${BASH_REMATCH[4]}
    [ -n "${BASH_REMATCH[6]}" ] && export PGPORT=${BASH_REMATCH[6]}
    return 0
  fi
  [[ $ci == *=* ]] || return 1
  for kv in $ci; do
    k=${kv%%=*}; v=${kv#*=}
    case $k in
      host) export PGHOST=$v ;;
      port) export PGPORT=$v ;;
      user) export PGUSER=$v ;;
    esac
  done
}

conninfo() {
  local s="dbname=$1"
  [ -n "${PGHOST:-}" ] && s="host=$PGHOST $s"
  [ -n "${PGPORT:-}" ] && s="$s port=$PGPORT"
  [ -n "${PGUSER:-}" ] && s="$s user=$PGUSER"
  echo "$s"
}

install() {
  local ci=$1 work=$2 db=$3 tgz
  command -v npm >/dev/null || { echo "npm not found (Debian package npm)" >&2; exit 3; }
  server_env "$ci" || { echo "cannot read host/port/user from '$ci'" >&2; exit 3; }
  mkdir -p "$work" || exit 3
  tgz=$(cd "$work" && npm pack --silent "@eventide/message-db@$VERSION" 2>"$work/npm.log" | tail -1)
  if [ -z "$tgz" ] || [ ! -f "$work/$tgz" ]; then
    echo "npm pack @eventide/message-db@$VERSION failed: $(tail -3 "$work/npm.log" | tr '\n' ' ')" >&2
    exit 3
  fi
  tar -xzf "$work/$tgz" -C "$work" || exit 3
  if ! DATABASE_NAME=$db PGOPTIONS="-c client_min_messages=warning" \
       bash "$work/package/database/install.sh" >"$work/install.log" 2>&1; then
    echo "Message DB install.sh failed: $(tail -5 "$work/install.log" | tr '\n' ' ')" >&2
    exit 1
  fi
  conninfo "$db"
}

remove() {
  server_env "$1" || exit 1
  dropdb --if-exists "$2"
}

case ${1:-} in
  install) [ $# = 4 ] || exit 2; install "$2" "$3" "$4" ;;
  remove) [ $# = 3 ] || exit 2; remove "$2" "$3" ;;
  *) echo "usage: $0 install CONNINFO WORKDIR DBNAME | remove CONNINFO DBNAME" >&2; exit 2 ;;
esac
