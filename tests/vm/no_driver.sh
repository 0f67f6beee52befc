#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# On a kernel without ublk (the build hosts), every ublk subcommand prints
# exactly one line naming the missing control device and exits 1; add checks
# its image first (one line naming a missing one). Skipped where ublk is
# loaded.
set -uo pipefail

bin=${UQ_BIN:?UQ_BIN must name the ublk-qcow2 binary}
[ -e /dev/ublk-control ] && { echo "SKIP: /dev/ublk-control exists: ublk is loaded here"; exit 77; }

want="ublk-qcow2: no /dev/ublk-control: load the ublk_drv module"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
img=$tmp/a.qcow2
"$bin" create -q -f qcow2 "$img" 64M || { echo "FAIL: create $img"; exit 1; }

fails=0
run() { # ARGS...
	local out rc
	out=$("$bin" "$@" 2>&1)
	rc=$?
	if [ "$rc" = 1 ] && [ "$out" = "$want" ]; then
		echo "PASS: $*"
	else
		echo "FAIL: $* (exit $rc):"
		echo "$out"
		fails=$((fails + 1))
	fi
}
run add "$img"
out=$("$bin" add "$tmp/missing.qcow2" 2>&1)
if [ $? = 1 ] && [ "$(echo "$out" | wc -l)" = 1 ] && [[ $out = *missing.qcow2* ]]; then
	echo "PASS: add $tmp/missing.qcow2: $out"
else
	echo "FAIL: add $tmp/missing.qcow2: $out"
	fails=$((fails + 1))
fi
run add -t null
run add --foreground -f raw "$img"
run del -n 0
run del -a
run list
run list --output=json
run features
run add --recovery "$img"
run recover -n 0
# refused before anything else: an overlay cannot outlive its daemon
out=$("$bin" add --recovery --overlay "$img" 2>&1)
rc=$?
if [ "$rc" = 1 ] && [ "$out" = "ublk-qcow2: $img: --overlay and --recovery cannot be combined (the overlay dies with the daemon)" ]; then
	echo "PASS: add --recovery --overlay refused"
else
	echo "FAIL: add --recovery --overlay (exit $rc): $out"
	fails=$((fails + 1))
fi
exit $((fails > 0))
