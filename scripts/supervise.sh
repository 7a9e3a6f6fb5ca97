#!/usr/bin/env bash
# Keep one process running: start it, and start it again when it exits.
#
#   scripts/supervise.sh NAME PIDFILE COMMAND [ARGS...]
#
# Writes the running child's pid to PIDFILE (for specs and operators),
# logs starts and exits on stderr, waits 1 s before a restart (up to 10 s
# while the child keeps dying within 5 s of its start, so a broken setup
# does not spin). TERM or INT stop the child and then the supervisor.
# scripts/serve.sh starts it with setsid, so scripts/stop.sh can stop the
# whole process group at once.
set -uo pipefail
[ $# -ge 3 ] || { echo "usage: $0 NAME PIDFILE COMMAND [ARGS...]" >&2; exit 2; }
name=$1 pidfile=$2; shift 2

child=
stop() {
  trap - TERM INT
  if [ -n "$child" ]; then
    kill -TERM "$child" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$child" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$child" 2>/dev/null
  fi
  rm -f "$pidfile"
  echo "$name: stopped" >&2
  exit 0
}
trap stop TERM INT

delay=1
while :; do
  started=$SECONDS
  "$@" &
  child=$!
  echo "$child" >"$pidfile"
  echo "$name: started (pid $child)" >&2
  wait "$child"
  rc=$?
  child=
  if [ $((SECONDS - started)) -lt 5 ]; then
    pause=$delay delay=$((delay * 2 > 10 ? 10 : delay * 2))
  else
    pause=1 delay=1
  fi
  echo "$name: exited ($rc), restarting in ${pause}s" >&2
  sleep "$pause" & wait $!
done
