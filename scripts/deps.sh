#!/usr/bin/env bash
# Install the Debian 12 packages this project needs (build, tests, benchmarks,
# HTTP service). Does nothing when everything is installed. As non-root it
# only reports what is missing (exit 1).
set -euo pipefail

# package-to-check (dpkg name). postgresql-client-15 stands for the
# postgresql-client metapackage (psql for benchmarks).
REQUIRED=(
  build-essential gcc make pkg-config
  lua5.4 liblua5.4-dev
  luajit2 libluajit2-5.1-dev
  libpq-dev uuid-dev
  lua-busted lua-check
  postgresql-15 postgresql-client-15
  lua-cjson lua-sql-postgres
  wrk nginx libnginx-mod-http-lua
  lua-argparse lua-term
  pgbouncer
)
# optional: clang and its runtime libraries (make fuzz: libFuzzer targets);
# chromium and chromium-driver (the web console's browser spec, skipped
# without them)
OPTIONAL=(clang libclang-rt-14-dev chromium chromium-driver)

installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

missing=()
for p in "${REQUIRED[@]}"; do installed "$p" || missing+=("$p"); done
missing_opt=()
for p in "${OPTIONAL[@]}"; do installed "$p" || missing_opt+=("$p"); done

if [ ${#missing[@]} -eq 0 ] && [ ${#missing_opt[@]} -eq 0 ]; then
  [ -n "${ES_DEPS_VERBOSE:-}" ] && echo "deps: all packages installed"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  if [ ${#missing[@]} -eq 0 ]; then
    [ -n "${ES_DEPS_VERBOSE:-}" ] && echo "deps: optional packages not installed: ${missing_opt[*]}"
    exit 0
  fi
  echo "deps: missing Debian packages: ${missing[*]}" >&2
  echo "deps: install them with: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "deps: installing ${missing[*]} ${missing_opt[*]}"
apt-get update -qq || [ ${#missing[@]} -eq 0 ]   # optional ones only: not fatal
# luajit2 conflicts with Debian's plain luajit: naming luajit2 explicitly
# makes apt replace it.
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ${#missing_opt[@]} -gt 0 ]; then
  apt-get install -y -qq --no-install-recommends "${missing_opt[@]}" >/dev/null \
    || echo "deps: optional ${missing_opt[*]} not installed (fine)"
fi
# Installing postgresql-15 may start Debian's "main" cluster; our tests never
# use it (they run a private cluster via scripts/pg.sh).
for p in "${missing[@]}"; do
  installed "$p" || { echo "deps: $p still not installed" >&2; exit 1; }
done
echo "deps: done"
