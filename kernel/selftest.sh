#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Self-test of the test-kernel kit: boots each kernel and runs guest/sanity.sh
# (ublk_drv loads and reloads, /dev/ublk-control, mkfs.ext4/xfs + mount on a loop
# device over a file in /data, fio libaio/io_uring with verify, qemu-img + qemu-nbd
# on the nbd module), then checks that the file the guest wrote to /data came back.
#
#   kernel/selftest.sh [6.1|6.12|sid]...      (default: all three)
#
# Prints one line per kernel with its boot time and a closing "N passed, N failed".
set -euo pipefail
kit=$(cd "$(dirname "$0")" && pwd)
ks=("$@")
[ "${#ks[@]}" -gt 0 ] || ks=(6.1 6.12 sid)
pass=0 fail=0
results=()
for k in "${ks[@]}"; do
	d=$(mktemp -d "${TMPDIR:-/tmp}/uq-selftest.XXXXXX")
	mkdir "$d/data"
	echo "from the host" >"$d/data/host.txt"
	rc=0
	"$kit/vm-run.sh" --kernel "$k" --timeout 600 --data "$d/data" -- "$kit/guest/sanity.sh" \
		2>"$d/err" || rc=$?
	cat "$d/err" >&2
	times=$(grep -o 'init ready.*' "$d/err" | tail -n1 || true)
	if [ "$rc" = 0 ] && grep -qx 'all=ok' "$d/data/sanity.txt" 2>/dev/null &&
		[ "$(cat "$d/data/host.txt")" = "from the host" ]; then
		pass=$((pass + 1))
		results+=("PASS $k: $(head -n1 "$d/data/sanity.txt"); $times")
	else
		fail=$((fail + 1))
		results+=("FAIL $k: vm-run.sh exit $rc; $(tr '\n' ' ' <"$d/data/sanity.txt" 2>/dev/null || true)")
	fi
	rm -rf "$d"
done
printf '%s\n' "${results[@]}"
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
