#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The ublk demo for hosts without a ublk driver: boots a Debian test kernel under
# qemu (TCG) and serves a qcow2 image as a block device there.
#
#   kernel/demo.sh [--kernel 6.1|6.12|sid]          (default 6.12)
#
# Builds build/ublk-qcow2 when needed ($UQ_BIN overrides the binary), creates a
# 1 GiB qcow2 image with qemu-img, and in the VM: ublk-qcow2 add → mkfs.ext4 on the
# /dev/ublkbN it prints → mount → write /hello.txt → umount → ublk-qcow2 del -a.
# Back on the host: qemu-img check on the image, and the file read back out of it
# (qemu-img convert to raw + debugfs: no mounts, no root needed for this part).
# First run: kernel/setup.sh (as root) and a few minutes of downloads (fetch.sh).
set -euo pipefail
kit=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$kit/.." && pwd)
k=6.12
while [ $# -gt 0 ]; do
	case $1 in
	--kernel) k=$2; shift 2 ;;
	-h | --help) awk 'NR > 2 && !/^#/ { exit } NR > 2 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
	*) echo "demo.sh: unknown argument '$1'" >&2; exit 2 ;;
	esac
done

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

build=${UQ_BUILD_DIR:-$top/build}
bin=${UQ_BIN:-$build/ublk-qcow2}
if [ -z "${UQ_BIN:-}" ]; then
	if [ ! -x "$bin" ] || [ -n "$(cd "$top" && find src tools CMakeLists.txt -newer "$bin" -print -quit)" ]; then
		echo "== building ublk-qcow2 in $build"
		cmake -S "$top" -B "$build" >/dev/null
		cmake --build "$build" -j "$(nproc 2>/dev/null || echo 2)"
	fi
fi
[ -x "$bin" ] || { echo "demo.sh: no ublk-qcow2 binary at $bin" >&2; exit 1; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/ublk-qcow2-vmdemo.XXXXXX")
trap 'rm -rf "$dir"' EXIT
mkdir "$dir/data"
img=$dir/data/disk.qcow2

echo "== ublk demo in a $k VM (qemu TCG; the host kernel needs no ublk driver)"
step qemu-img create -f qcow2 "$img" 1G
step "$kit/vm-run.sh" --kernel "$k" --timeout 600 --bin "$bin" --data "$dir/data" -v \
	-- "$kit/guest/demo.sh"
echo
echo "== back on the host"
step qemu-img check "$img"
step qemu-img info "$img"
step qemu-img convert -O raw "$img" "$dir/disk.raw"
step debugfs -R "cat /hello.txt" "$dir/disk.raw"
echo
echo "== demo done: the VM's ublk device wrote a clean qcow2 image with the file in it"
