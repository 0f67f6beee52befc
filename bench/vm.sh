#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# VM benchmark: fio (libaio, direct, QD128 in two jobs, batches of 16) on
# /dev/ublkbN served by ublk-qcow2 against the peers on the same kind of file,
# in one run of the test VM (kernel/vm-run.sh, TCG): qemu-nbd (--aio=native)
# on /dev/nbd0, the kernel's loop driver on a raw file (direct I/O), and our
# own raw (-f raw) and null (-t null) targets; a preallocated qcow2 image with
# one and two queues, and empty images (every write allocates) for ublk-qcow2
# and qemu-nbd. The images live on a tmpfs inside the guest. TCG distorts the
# absolute numbers: only the ratios within one run mean something.
#
#   bench/vm.sh [KERNEL] [ROUNDS] [RUNTIME]     (defaults: 6.12, 1, 5 seconds per job)
#
# UQ_BIN: the binary (default build/ublk-qcow2). Targets (issue 5): >= 3x
# qemu-nbd on 4k random read and write (preallocated), >= 0.9x loop on 4k
# random reads, two queues >= 1.6x one queue on random reads. Also prints the
# daemon's peak RSS, and that of a 1 TiB image with a 4 MiB L2 cache (target:
# cache + 16 MiB).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
k=${1:-6.12} rounds=${2:-1} runtime=${3:-5}
bin=${UQ_BIN:-$top/build/ublk-qcow2}
size_mb=512
[ -x "$bin" ] || { echo "bench/vm.sh: no binary at $bin (build first)" >&2; exit 1; }
"$top/kernel/fetch.sh" "$k" >/dev/null

work=$(mktemp -d "${TMPDIR:-/tmp}/uq-vmbench.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/data"
# each job: ~1 s ramp + RUNTIME + fio's start; 40 jobs a round
timeout=$((rounds * 40 * (runtime + 6) + 300))
cp "$top/bench/vm-guest-lib.sh" "$work/data/"
"$top/kernel/vm-run.sh" --kernel "$k" --cpus 2 --mem 3072 --timeout "$timeout" \
	--bin "$bin" --data "$work/data" --data-size 256M \
	-- "$top/bench/vm-guest.sh" "$runtime" "$rounds" "$size_mb" >"$work/vm.log" 2>&1 || {
	tail -n 40 "$work/vm.log" >&2
	echo "bench/vm.sh: the VM run failed" >&2
	exit 1
}
[ -s "$work/data/results" ] || { echo "bench/vm.sh: no results came back" >&2; exit 1; }

python3 - "$work/data/results" "$k" "$rounds" "$runtime" <<'PY'
import statistics, sys
from collections import defaultdict

path, kernel, rounds, runtime = sys.argv[1:5]
iops = defaultdict(list)
rss = defaultdict(list)
big = None
for line in open(path):
    f = line.split()
    if f and f[0] == "RESULT":
        iops[(f[2], f[3])].append(float(f[4]))
    elif f and f[0] == "RSS":
        rss[f[1]].append(int(f[2]))
    elif f and f[0] == "BIGRSS":
        big = [int(x) for x in f[1:4]]

def med(t, w):
    v = iops.get((t, w))
    return statistics.median(v) if v else 0.0

targets = ["qcow2-q1", "qcow2-q2", "nbd", "loop", "raw", "null", "qcow2-empty", "nbd-empty"]
works = ["randread-4k", "randwrite-4k", "randrw-4k", "read-64k", "write-64k", "read-512k", "write-512k"]
print(f"fio IOPS in the {kernel} VM (TCG), {rounds} round(s) of {runtime} s per job, "
      "libaio direct QD128 (2 jobs x 64), images on a guest tmpfs")
print(f"{'workload':<14}" + "".join(f"{t:>12}" for t in targets))
for w in works:
    print(f"{w:<14}" + "".join(f"{med(t, w):>12,.0f}" if med(t, w) else f"{'-':>12}" for t in targets))

def ratio(a, b, w):
    x, y = med(a, w), med(b, w)
    return x / y if y else float("nan")

print()
print("ratios (target in brackets):")
rows = [
    ("qcow2 / qemu-nbd, 4k randread (>= 3)", ratio("qcow2-q1", "nbd", "randread-4k")),
    ("qcow2 / qemu-nbd, 4k randwrite (>= 3)", ratio("qcow2-q1", "nbd", "randwrite-4k")),
    ("qcow2 / qemu-nbd, 4k randrw", ratio("qcow2-q1", "nbd", "randrw-4k")),
    ("qcow2 / loop, 4k randread (>= 0.9)", ratio("qcow2-q1", "loop", "randread-4k")),
    ("2 queues / 1 queue, 4k randread (>= 1.6)", ratio("qcow2-q2", "qcow2-q1", "randread-4k")),
    ("qcow2 / qemu-nbd, empty image, 4k randwrite", ratio("qcow2-empty", "nbd-empty", "randwrite-4k")),
    ("qcow2 / qemu-nbd, 64k read", ratio("qcow2-q1", "nbd", "read-64k")),
    ("qcow2 / qemu-nbd, 512k read", ratio("qcow2-q1", "nbd", "read-512k")),
    ("qcow2 / qemu-nbd, 512k write", ratio("qcow2-q1", "nbd", "write-512k")),
]
for name, r in rows:
    print(f"  {name:<46} {r:6.2f}x")
print()
for t in targets:
    if rss.get(t):
        print(f"daemon peak RSS, {t:<12} {max(rss[t]) / 1024:7.1f} MiB")
if big:
    print(f"1 TiB image, 4 KiB clusters, {big[1] // 1024} MiB L2 cache, image file {big[2] / 1024:.0f} MiB "
          f"after random writes: peak RSS {big[0] / 1024:.1f} MiB (target <= {big[1] / 1024 + 16:.0f} MiB)")
PY
