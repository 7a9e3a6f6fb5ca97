#!/usr/bin/env bash
# scripts/fuzz.sh TARGET... - runs each libFuzzer target (built by
# `make fuzz-build` into build/fuzz/) for FUZZ_SECONDS (default 30) on its
# seed corpus fuzz/corpus/TARGET plus what earlier runs found in
# build/fuzz/corpus/TARGET (new inputs go there, never into the repository).
# A finding (crash, sanitizer report, broken property) is saved as
# build/fuzz/findings/TARGET-*; fix it, then add the input to the seed
# corpus. Prints a line per target and, last, `N passed, N failed`.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
seconds=${FUZZ_SECONDS:-30}
passed=0 failed=0
mkdir -p build/fuzz/findings
for t in "$@"; do
  bin=build/fuzz/$t
  mkdir -p "build/fuzz/corpus/$t"
  log=build/fuzz/$t.log
  "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -max_len=8192 -print_final_stats=1 \
    -artifact_prefix="build/fuzz/findings/$t-" \
    "build/fuzz/corpus/$t" "fuzz/corpus/$t" >"$log" 2>&1
  rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  found=$(ls "build/fuzz/findings/$t-"* 2>/dev/null | wc -l)
  if [ "$rc" = 0 ]; then
    passed=$((passed + 1))
    echo "fuzz $t: ${execs:-?} executions in ${seconds}s, no finding"
  else
    failed=$((failed + 1))
    echo "fuzz $t: FAILED (exit $rc) after ${execs:-?} executions; $found finding(s) in build/fuzz/findings/"
    grep -E "FUZZ FINDING|ERROR: |SUMMARY: |runtime error" "$log" | head -5 | sed 's/^/  /'
  fi
done
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
