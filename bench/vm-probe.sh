#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# A short VM probe: fio 4k random reads (as bench/vm.sh runs them) on chosen
# variants only, in one boot of the test VM; for finding where a device's
# time goes without the whole bench/vm.sh.
#
#   bench/vm-probe.sh KERNEL RUNTIME VARIANT...
#
# Variants (bench/vm-probe-guest.sh): qcow2-falloc (vm-guest.sh's image:
# clusters fallocated, never written), qcow2-full (every cluster written),
# qcow2-full-q2, qcow2-full-nzc (--no-zero-copy), qcow2-full-nuc (--no-user-copy),
# raw-written, raw-written-nzc, raw-written-nuc,
# raw-falloc, loop-written, qcow2-e4k (a fresh empty image, 4 KiB clusters),
# qcow2-e4k-nzc, null (-t null), null-q2, raw-written-q2. UQ_ICOUNT=N: qemu's
# -icount shift=N (guest time counts instructions: results stop depending on
# the host's load).
# UQ_PROBE_FS=brd: the files on ext4 over a RAM disk instead of tmpfs.
# UQ_PROBE_RW=randwrite (or randrw): fio's --rw instead of randread.
# UQ_PROBE_PERF=1: a guest-wide perf profile of each fio run (perf-VARIANT.txt
# next to the results; with UQ_ICOUNT, in guest instructions).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
k=$1 runtime=$2
shift 2
bin=${UQ_BIN:-$top/build/ublk-qcow2}
"$top/kernel/fetch.sh" "$k" >/dev/null
work=$(mktemp -d "${TMPDIR:-/tmp}/uq-vmprobe.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/data" "$work/bin"
if [ -n "${UQ_ICOUNT:-}" ]; then
	# Guest time from instructions executed (one vCPU at a time): IOPS then
	# measure the guest's CPU cost per I/O, not the host's load.
	real=$(command -v qemu-system-x86_64)
	printf '#!/bin/sh\nexec %s "$@" -icount shift=%s,sleep=off\n' "$real" "$UQ_ICOUNT" \
		>"$work/bin/qemu-system-x86_64"
	chmod +x "$work/bin/qemu-system-x86_64"
	PATH=$work/bin:$PATH
fi
cp "$top/bench/vm-guest-lib.sh" "$work/data/"
if [ -n "${UQ_PROBE_PERF:-}" ]; then
	perf=$(command -v perf) || { echo "bench/vm-probe.sh: UQ_PROBE_PERF needs perf (linux-perf)" >&2; exit 1; }
	export UQ_VM_PROGS="${UQ_VM_PROGS:-} $perf"
fi
"$top/kernel/vm-run.sh" --kernel "$k" --cpus 2 --mem 3072 --timeout $(($# * (runtime * 20 + 60) + 300)) \
	--bin "$bin" --data "$work/data" --data-size 64M \
	-e FS="${UQ_PROBE_FS:-tmpfs}" -e RW="${UQ_PROBE_RW:-randread}" -e PERF="${UQ_PROBE_PERF:-}" -- "$top/bench/vm-probe-guest.sh" "$runtime" 512 "$@" >"$work/vm.log" 2>&1 || {
	tail -n 40 "$work/vm.log" >&2
	echo "bench/vm-probe.sh: the VM run failed" >&2
	exit 1
}
cat "$work/data/results"
[ -z "${UQ_PROBE_PERF:-}" ] || tail -n +1 "$work"/data/perf-*.txt
