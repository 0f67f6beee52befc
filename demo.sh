#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The main job, end to end: build ublk-qcow2 (if needed) and show it at work.
#
#   ./demo.sh          1. host tools: create -> io -> info -> map -> convert ->
#                         compare with qemu-img -> check (no root, no ublk)
#                      2. the block device: add -> mkfs.ext4 -> mount -> write
#                         -> umount -> del -> qemu-img check, on this host when
#                         it has /dev/ublk-control (as root), else in the test
#                         VM from kernel/ (kernel/demo.sh)
#
# Set up first (as root): ./tests/setup.sh
set -euo pipefail
cd "$(dirname "$0")"
top=$PWD
build=${UQ_BUILD_DIR:-$top/build}
bin=$build/ublk-qcow2

bold= plain=
if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; fi

# Print a command (quoting arguments with spaces) and run it.
step() {
	local a line=
	for a in "$@"; do
		case "$a" in *' '*) line+=" '$a'" ;; *) line+=" $a" ;; esac
	done
	printf '\n%s$%s%s\n' "$bold" "$line" "$plain"
	"$@"
}

build_tool() {
	if [ ! -x "$bin" ] || [ -n "$(find src tools CMakeLists.txt -newer "$bin" -print -quit)" ]; then
		echo "== building ublk-qcow2 in $build"
		cmake -S "$top" -B "$build" >/dev/null
		cmake --build "$build" -j "$(nproc 2>/dev/null || echo 2)"
	fi
}

demo_host() {
	local img raw
	dir=$(mktemp -d "${TMPDIR:-/tmp}/ublk-qcow2-demo.XXXXXX")
	img=$dir/disk.qcow2
	raw=$dir/disk.raw

	echo "== host demo in $dir"
	step "$bin" create -f qcow2 -o cluster_size=64k "$img" 1G
	step "$bin" io "$img" \
		-c "write -P 0xab 0 1M" \
		-c "write -P 0xcd 100M 64k" \
		-c "write -z 512k 128k" \
		-c "write -P 0xef 1023M 1M" \
		-c "discard 100M 64k" \
		-c flush
	step "$bin" io -r "$img" \
		-c "read -P 0xab 0 512k" \
		-c "read -P 0 512k 128k" \
		-c "read -P 0xef 1023M 1M"
	step "$bin" info "$img"
	step "$bin" map "$img"
	step "$bin" convert -O raw "$img" "$raw"
	echo "(our raw copy and the image read by qemu-img must be identical)"
	step qemu-img compare -f qcow2 -F raw "$img" "$raw"
	step "$bin" check "$img"
	step qemu-img check "$img"
	echo
	echo "== host demo done: every step agreed with qemu-img"
}

# The block device on this host: needs root and the ublk_drv module.
demo_ublk_host() {
	local img dev mnt
	dir=$(mktemp -d "${TMPDIR:-/tmp}/ublk-qcow2-demo.XXXXXX")
	img=$dir/disk.qcow2
	mnt=$dir/mnt
	mkdir -p "$mnt"
	echo "== ublk demo on this host in $dir"
	step qemu-img create -q -f qcow2 "$img" 1G
	dev=$("$bin" add "$img")
	echo "served as $dev"
	step mkfs.ext4 -q "$dev"
	step mount "$dev" "$mnt"
	echo "hello from ublk-qcow2" >"$mnt/hello.txt"
	step umount "$mnt"
	step "$bin" del -a
	step qemu-img check "$img"
}

dir=
trap '[ -z "$dir" ] || rm -rf "$dir"' EXIT
build_tool
demo_host
if [ -e /dev/ublk-control ] && [ "$(id -u)" -eq 0 ]; then
	rm -rf "$dir"
	demo_ublk_host
else
	echo
	echo "== no /dev/ublk-control here: the same demo in the test VM (kernel/demo.sh)"
	UQ_BIN=$bin "$top/kernel/demo.sh"
fi
