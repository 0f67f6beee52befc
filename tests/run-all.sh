#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Build and run every test twice: a normal build (build/) and an
# AddressSanitizer + UndefinedBehaviorSanitizer build (build-asan/); then
# the libFuzzer targets for a bounded time each (build-fuzz/, clang,
# ASan + UBSan: the fuzz/* tests only, about 3 minutes).
# A test that is skipped fails the run: skips never count as passes
# (UQ_ALLOW_SKIP=1 lets them through, for machines without the oracle tools).
#
# Usage: ./tests/run-all.sh [normal|asan|fuzz]...   (default: all three)
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=$(nproc 2>/dev/null || echo 2)
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(normal asan fuzz)

run_config() {
	local name=$1 dir sanitize log extra=() only=()
	case "$name" in
	normal) dir=build; sanitize=OFF ;;
	asan) dir=build-asan; sanitize=ON ;;
	fuzz) dir=build-fuzz; sanitize=OFF
	      extra=(-DCMAKE_C_COMPILER=clang -DUQ_FUZZ=ON); only=(-R '^fuzz/' -V) ;;
	*) echo "run-all.sh: unknown configuration '$name'" >&2; return 1 ;;
	esac
	log=$dir/ctest.log

	echo "=== $name: configure + build ($dir, UQ_SANITIZE=$sanitize)"
	cmake -S . -B "$dir" -DUQ_SANITIZE="$sanitize" "${extra[@]}"
	cmake --build "$dir" -j "$jobs"

	echo "=== $name: ctest"
	local rc=0
	ctest --test-dir "$dir" --output-on-failure --timeout 1500 -j "$jobs" "${only[@]}" 2>&1 |
		tee "$log" || rc=$?
	if [ $rc -ne 0 ]; then
		echo "=== $name: FAILED (see $log)" >&2
		return $rc
	fi
	if grep -q '(Skipped)' "$log"; then
		if [ "${UQ_ALLOW_SKIP:-0}" = 1 ]; then
			echo "=== $name: some tests were SKIPPED (allowed by UQ_ALLOW_SKIP=1)" >&2
		else
			echo "=== $name: some tests were SKIPPED; skips do not count as passes" >&2
			return 1
		fi
	fi
	if grep -q 'No tests were found' "$log"; then
		echo "=== $name: no tests were found" >&2
		return 1
	fi
	echo "=== $name: all tests passed"
}

for c in "${configs[@]}"; do
	run_config "$c"
done
