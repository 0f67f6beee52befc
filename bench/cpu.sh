#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# CPU cost: user-space instructions per I/O of `ublk-qcow2 bench` and of
# `qemu-img bench` (same image, same flags), counted by valgrind's callgrind,
# which counts exactly and so does not care how busy the machine is. Each
# tool runs twice, with COUNT and 2 x COUNT requests: the difference divided
# by COUNT is the cost of one more I/O, without start-up and image opening.
# Kernel work (io_uring, io-wq, the page cache) is not counted: this is what
# the engine itself spends.
#
#   bench/cpu.sh [COUNT]        (default 20000; UQ_BIN: the binary, default build/)
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
bin=${UQ_BIN:-$top/build/ublk-qcow2}
count=${1:-20000}
for t in qemu-img qemu-io valgrind python3; do
	command -v "$t" >/dev/null || { echo "bench/cpu.sh: $t not found" >&2; exit 1; }
done
[ -x "$bin" ] || { echo "bench/cpu.sh: no binary at $bin (build first)" >&2; exit 1; }
dir=$(mktemp -d /dev/shm/uq-cpu.XXXXXX)
trap 'rm -rf "$dir"' EXIT

pre=$dir/pre.qcow2
qemu-img create -q -f qcow2 -o preallocation=falloc "$pre" 256M
qemu-io -f qcow2 -c "write -P 0x5a 0 256M" "$pre" >/dev/null

# instr IMAGE_KIND N TOOL ARGS...: callgrind's instruction total for one run
instr() {
	local kind=$1 n=$2 img
	shift 2
	img=$pre
	if [ "$kind" = empty ]; then
		img=$dir/empty.qcow2
		rm -f "$img"
		qemu-img create -q -f qcow2 "$img" 4G
	fi
	valgrind --tool=callgrind --callgrind-out-file=/dev/null "$@" -c "$n" "$img" 2>&1 |
		sed -n 's/^==[0-9]*== Collected : \([0-9]*\)$/\1/p'
}

# one NAME KIND ARGS...: instructions per I/O, ours and qemu-img's
one() {
	local name=$1 kind=$2 o1 o2 q1 q2
	shift 2
	o1=$(instr "$kind" "$count" "$bin" bench -t none -i io_uring "$@")
	o2=$(instr "$kind" $((2 * count)) "$bin" bench -t none -i io_uring "$@")
	q1=$(instr "$kind" "$count" qemu-img bench -f qcow2 -t none -i io_uring "$@")
	q2=$(instr "$kind" $((2 * count)) qemu-img bench -f qcow2 -t none -i io_uring "$@")
	python3 - "$name" "$count" "$o1" "$o2" "$q1" "$q2" <<'PY'
import sys
name, n = sys.argv[1], int(sys.argv[2])
o1, o2, q1, q2 = (int(x) for x in sys.argv[3:7])
ours, theirs = (o2 - o1) / n, (q2 - q1) / n
print(f"{name:<24} ours {ours:8,.0f} instr/IO   qemu-img {theirs:8,.0f} instr/IO   "
      f"qemu-img / ours {theirs / ours:5.2f}x")
PY
}

echo "user-space instructions per I/O (callgrind), $count and $((2 * count)) requests per run"
one "read 4k QD32" pre -d 32 -s 4k
one "write 4k QD32" pre -w -d 32 -s 4k
one "alloc write 4k QD32" empty -w -d 32 -s 4k
one "read 64k QD32" pre -d 32 -s 64k
