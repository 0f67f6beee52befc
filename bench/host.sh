#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Host benchmark: `ublk-qcow2 bench` against `qemu-img bench` with the same
# flags on the same kind of image (-t none -i io_uring, on tmpfs so that the
# machine's disk does not set the pace), alternating the two, ROUNDS rounds;
# prints the median of the per-round IOPS ratios. Plus fio on a raw file on
# the same tmpfs, with the same workload: the ceiling for reads.
#
#   bench/host.sh [ROUNDS]        (default 5; UQ_BIN: the binary, default build/;
#                                  UQ_BENCH_DIR: where the images go, default /dev/shm)
#
# Workloads: 4k and 64k, reads and writes, QD 1 and 32, on a preallocated
# (falloc) 1 GiB image; allocating writes on an empty image (a fresh one per
# run). Targets (issue 5): >= 1.5x qemu-img bench for 4k QD32 allocated reads,
# allocated writes and allocating writes; >= 0.9x fio for 4k QD32 reads.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
bin=${UQ_BIN:-$top/build/ublk-qcow2}
rounds=${1:-5}
for t in qemu-img fio python3; do
	command -v "$t" >/dev/null || { echo "bench/host.sh: $t not found" >&2; exit 1; }
done
[ -x "$bin" ] || { echo "bench/host.sh: no binary at $bin (build first)" >&2; exit 1; }
dir=$(mktemp -d "${UQ_BENCH_DIR:-/dev/shm}/uq-bench.XXXXXX")
trap 'rm -rf "$dir"' EXIT
size=1G

# seconds TOOL ARGS...: the run time qemu-img bench's last line reports
seconds() {
	"$@" | sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p'
}

prealloc=$dir/pre.qcow2
qemu-img create -q -f qcow2 -o preallocation=falloc "$prealloc" $size
qemu-io -f qcow2 -c "write -P 0x5a 0 $size" "$prealloc" >/dev/null

# one NAME COUNT ARGS...: ROUNDS alternating runs of both; prints the line
one() {
	local name=$1 count=$2 r ours theirs img ratios=()
	shift 2
	for r in $(seq "$rounds"); do
		for who in ours theirs; do
			img=$prealloc
			if [ "$name" = "${name#alloc}" ]; then :; else
				img=$dir/empty.qcow2
				rm -f "$img"
				qemu-img create -q -f qcow2 "$img" $size
			fi
			if [ $who = ours ]; then
				ours=$(seconds "$bin" bench -c "$count" -t none -i io_uring "$@" "$img")
			else
				theirs=$(seconds qemu-img bench -f qcow2 -c "$count" -t none -i io_uring "$@" "$img")
			fi
		done
		ratios+=("$(python3 -c "print($theirs / $ours)")")
		last_ours=$ours last_theirs=$theirs
	done
	python3 - "$name" "$count" "$last_ours" "$last_theirs" "${ratios[@]}" <<'PY'
import statistics, sys
name, count, ours, theirs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
r = sorted(float(x) for x in sys.argv[5:])
print(f"{name:<28} ours {count / ours:>10,.0f} IOPS  qemu-img {count / theirs:>10,.0f} IOPS"
      f"  ratio median {statistics.median(r):5.2f}x (min {r[0]:.2f}, max {r[-1]:.2f})")
PY
}

echo "ublk-qcow2 bench vs qemu-img bench, $rounds rounds, images on $dir ($(stat -f -c %T "$dir")), -t none -i io_uring"
one "read 4k QD32" 200000 -d 32 -s 4k
one "read 4k QD1" 50000 -d 1 -s 4k
one "read 64k QD32" 40000 -d 32 -s 64k
one "write 4k QD32" 200000 -w -d 32 -s 4k
one "write 4k QD1" 50000 -w -d 1 -s 4k
one "write 64k QD32" 40000 -w -d 32 -s 64k
one "alloc write 4k QD32" 100000 -w -d 32 -s 4k
one "alloc write 64k QD32" 16000 -w -d 32 -s 64k

# The ceiling: fio reading a raw file on the same tmpfs with the bench's
# workload: 200,000 4 KiB reads at consecutive offsets (the bench's default
# step is its request size, as qemu-img bench's), 32 in flight, O_DIRECT,
# io_uring, submitting every free slot at once and reaping what is done as
# the bench's loop does (fio's defaults submit and reap one at a time).
# Alternating, ROUNDS rounds, median of the ratios.
# The write runs above left zeros in the image; -S 0 keeps them as data, so
# fio reads a file as allocated as the image (holes would read without I/O).
raw=$dir/raw.img
qemu-img convert -S 0 -O raw "$prealloc" "$raw"
ratios=()
for r in $(seq "$rounds"); do
	fio_iops=$(fio --name=ceiling --filename="$raw" --direct=1 --ioengine=io_uring --iodepth=32 \
		--iodepth_batch_submit=32 --iodepth_batch_complete_min=1 \
		--rw=read --bs=4k --size=$size --number_ios=200000 \
		--output-format=terse --terse-version=3 | cut -d';' -f8)
	ours=$(seconds "$bin" bench -c 200000 -d 32 -s 4k -t none -i io_uring "$prealloc")
	ratios+=("$(python3 -c "print(200000 / $ours / $fio_iops)")")
done
python3 - "$fio_iops" "$ours" "${ratios[@]}" <<'PY'
import statistics, sys
fio, ours = float(sys.argv[1]), 200000 / float(sys.argv[2])
r = sorted(float(x) for x in sys.argv[3:])
print(f"{'read 4k QD32 vs fio (raw)':<28} ours {ours:>10,.0f} IOPS  fio      {fio:>10,.0f} IOPS"
      f"  ratio median {statistics.median(r):5.2f}x (min {r[0]:.2f}, max {r[-1]:.2f})")
PY
