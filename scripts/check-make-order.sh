#!/usr/bin/env bash
# Fails when a make target a user may type first would compile anything
# before installing the Debian packages it needs (scripts/deps.sh): on a
# fresh Debian 12, lua.h and libpq-fe.h come from those packages.
#
#   scripts/check-make-order.sh [-C DIR] [TARGET...]
#                        (default: this checkout, the targets below)
#
# Reads `make -n -B TARGET` (and with -j2: prerequisite order must not be
# what keeps it right): the first line that mentions `deps` must come before
# the first compiler line (` -c src/`). -B makes every file out of date, so
# the compile lines show even in a built tree. Nothing is run or built.
set -uo pipefail
dir="$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${1:-}" = -C ]; then dir=$2; shift 2; fi
cd "$dir" || exit 1

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(demo test check-memory bench serve)

bad=0
for t in "${targets[@]}"; do
  for jobs in "" "-j2"; do
    out=$(make -n -B $jobs "$t" 2>&1) || { echo "check-make-order: make -n $jobs $t failed:"; echo "$out"; bad=1; continue; }
    first_deps=$(grep -nE 'deps' <<<"$out" | head -1 | cut -d: -f1)
    first_cc=$(grep -nE ' -c src/' <<<"$out" | head -1 | cut -d: -f1)
    if [ -z "$first_cc" ]; then
      echo "check-make-order: make -n -B $jobs $t shows no compile line (cannot check)"; bad=1
    elif [ -z "$first_deps" ] || [ "$first_deps" -gt "$first_cc" ]; then
      echo "check-make-order: make $jobs $t compiles (line $first_cc) before installing dependencies (line ${first_deps:-none})"
      bad=1
    else
      echo "check-make-order: make $jobs $t: deps (line $first_deps) before the first compile (line $first_cc)"
    fi
  done
done
exit $bad
