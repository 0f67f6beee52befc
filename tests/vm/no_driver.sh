#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# On a kernel without ublk (the build hosts), every ublk subcommand prints
# exactly one line naming the missing control device and exits 1 - and add
# says so before it looks at the image. Skipped where ublk is loaded.
set -uo pipefail

bin=${UQ_BIN:?UQ_BIN must name the ublk-qcow2 binary}
[ -e /dev/ublk-control ] && { echo "SKIP: /dev/ublk-control exists: ublk is loaded here"; exit 77; }

want="ublk-qcow2: no /dev/ublk-control: load the ublk_drv module"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
qemu_img=$(command -v qemu-img || true)
img=$tmp/missing.qcow2
[ -n "$qemu_img" ] && { img=$tmp/a.qcow2; "$qemu_img" create -q -f qcow2 "$img" 64M; }

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
run add "$tmp/missing.qcow2"
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
