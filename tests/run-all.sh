#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# First build everything (no tests) as Release (-O3, build-release/) and
# Debug (-O0, build-debug/): -Werror at other optimization levels sees other
# warnings (gcc's maybe-uninitialized after inlining). Then build and run
# every test twice: a normal build (build/) and an AddressSanitizer +
# UndefinedBehaviorSanitizer build (build-asan/); then the libFuzzer targets
# for a bounded time each (build-fuzz/, clang, ASan + UBSan: the fuzz/*
# tests only, about 3 minutes).
# A test that is skipped fails the run: skips never count as passes
# (UQ_ALLOW_SKIP=1 lets them through, for machines without the oracle tools).
#
# Usage: ./tests/run-all.sh [builds|normal|asan|fuzz]...   (default: all four)
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=$(nproc 2>/dev/null || echo 2)
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(builds normal asan fuzz)

# Configure and build, no tests: every target must compile warning-free
# (-Werror) at each build type.
build_types() {
	local type dir

	for type in Release Debug; do
		dir=build-${type,,}
		echo "=== builds: configure + build ($dir, CMAKE_BUILD_TYPE=$type)"
		cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE="$type" -DUQ_SANITIZE=OFF
		cmake --build "$dir" -j "$jobs"
	done
	echo "=== builds: all built"
}

run_config() {
	local name=$1 dir sanitize log extra=() only=()
	case "$name" in
	builds) build_types; return ;;
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
