#!/bin/sh
# SPDX-License-Identifier: MIT
# Run one libFuzzer target for a bounded time (ctest: fuzz/NAME):
#   run.sh FUZZER SEED_DIR SECONDS ARTIFACT_DIR
# First every committed regression input for it (tests/images/fuzz/NAME-*)
# once, then fuzzing from a fresh corpus seeded from SEED_DIR. Prints the
# executions run; any crash, leak, timeout or out-of-memory fails.
set -eu
fuzzer=$1 seeds=$2 secs=$3 artifacts=$4
name=$(basename "$fuzzer" | sed 's/^fuzz_//')
here=$(cd "$(dirname "$0")" && pwd)
corpus=$(mktemp -d "${TMPDIR:-/tmp}/uq-fuzz-$name-XXXXXX")
trap 'rm -rf "$corpus"' EXIT
mkdir -p "$artifacts"
opts="-timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 -artifact_prefix=$artifacts/$name-"

set -- "$here"/../images/fuzz/"$name"-*
if [ -e "$1" ]; then
	echo "fuzz_$name: $# regression input(s)"
	"$fuzzer" $opts "$@" 2>&1 | tail -n 3
fi
log=$corpus.log
rc=0
"$fuzzer" $opts -max_total_time="$secs" -print_final_stats=1 "$corpus" "$seeds" >"$log" 2>&1 || rc=$?
runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
# The whole report when it failed; the figures when it did not.
if [ $rc -ne 0 ]; then
	tail -n 60 "$log"
else
	grep '^stat::' "$log"
fi
echo "fuzz_$name: ${runs:-?} executions in ${secs} s (exit $rc)"
rm -f "$log"
exit $rc
