#!/bin/sh
# SPDX-License-Identifier: MIT
# The guest half of bench/vm.sh, run by kernel/vm-run.sh in the test VM (busybox
# sh, as root, in /data). Images live on a tmpfs in the guest so that the VM's
# emulated disk does not set the pace; every target serves the same kind of
# file. Writes one line per (round, target, workload) to /data/results:
#   RESULT ROUND TARGET WORKLOAD IOPS
# the ublk-qcow2 daemon's peak RSS (KiB) per device it served:
#   RSS TARGET KIB
# and for a 1 TiB image with a 4 MiB L2 cache: BIGRSS KIB CACHE_KIB IMAGE_KIB
#
#   vm-guest.sh RUNTIME ROUNDS SIZE_MB

runtime=${1:-5} rounds=${2:-1} size=${3:-512}
TMPFS_MB=$((size * 3 + 256))
. ./vm-guest-lib.sh
qemu-img create -q -f qcow2 -o preallocation=falloc "$W/pre.qcow2" "${size}M" || exit 1
fallocate -l "${size}M" "$W/raw.img" 2>/dev/null || truncate -s "${size}M" "$W/raw.img"
dd if=/dev/zero of="$W/raw.img" bs=1M count="$size" conv=notrunc status=none

NBD=0

# up TARGET: bring TARGET's device up (fresh empty images for the *-empty ones)
up() {
	PID=''
	case $1 in
	qcow2-q1) ublk_up -q 1 "$W/pre.qcow2" ;;
	qcow2-q2) ublk_up -q 2 "$W/pre.qcow2" ;;
	qcow2-empty)
		rm -f "$W/empty.qcow2"
		qemu-img create -q -f qcow2 "$W/empty.qcow2" "${size}M" && ublk_up -q 1 "$W/empty.qcow2" ;;
	raw) ublk_up -q 1 -f raw "$W/raw.img" ;;
	null) ublk_up -q 1 -t null --size "${size}M" ;;
	nbd | nbd-empty)
		img=$W/pre.qcow2
		if [ "$1" = nbd-empty ]; then
			rm -f "$W/empty.qcow2"
			qemu-img create -q -f qcow2 "$W/empty.qcow2" "${size}M"
			img=$W/empty.qcow2
		fi
		qemu-nbd --aio=native --cache=none -f qcow2 -c /dev/nbd0 "$img" || return 1
		DEV=/dev/nbd0 NBD=1
		i=0
		while [ "$(cat /sys/block/nbd0/size 2>/dev/null)" = 0 ] && [ $i -lt 50 ]; do
			sleep 0.1; i=$((i + 1))
		done ;;
	loop) DEV=$(losetup --direct-io=on -f --show "$W/raw.img") ;;
	*) return 1 ;;
	esac
}

down() { # TARGET
	case $1 in
	nbd*) qemu-nbd -d /dev/nbd0 >/dev/null; sleep 0.5 ;;
	loop) losetup -d "$DEV" ;;
	*)
		if [ -n "$PID" ]; then
			# the daemon's peak resident set, with its L2 cache limit
			hwm=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$PID/status")
			echo "RSS $1 $hwm" >>"$R"
		fi
		"$B" del -n "$ID" ;;
	esac
}

# fio_run NAME RW BS [EXTRA...]: one timed fio job on $DEV, prints the IOPS
fio_run() {
	name=$1 rw=$2 bs=$3
	shift 3
	fio --name="$name" --filename="$DEV" --direct=1 --ioengine=libaio \
		--iodepth=128 --iodepth_batch_submit=16 --iodepth_batch_complete_min=1 \
		--rw="$rw" --bs="$bs" --size="${size}m" --numjobs=2 --offset_increment=$((size / 2))m \
		--group_reporting --time_based --runtime="$runtime" --ramp_time=1 \
		--minimal "$@" 2>/tmp/fio.err >/tmp/fio.out || { cat /tmp/fio.err >&2; echo 0; return; }
	# terse v3: read IOPS is field 8, write IOPS field 49
	awk -F';' '{ print $8 + $49 }' /tmp/fio.out
}

# workloads TARGET ROUND: every workload on TARGET (one device per workload for
# the empty images, so that every write allocates)
workloads() {
	t=$1 r=$2
	for w in randread-4k randwrite-4k randrw-4k read-64k write-64k read-512k write-512k; do
		case $t:$w in *-empty:*read*) continue ;; esac
		up "$t" || { echo "RESULT $r $t $w 0" >>"$R"; echo "bench: $t did not come up" >&2; continue; }
		case $w in
		randread-4k) iops=$(fio_run "$w" randread 4k) ;;
		randwrite-4k) iops=$(fio_run "$w" randwrite 4k) ;;
		randrw-4k) iops=$(fio_run "$w" randrw 4k --rwmixread=70) ;;
		read-64k) iops=$(fio_run "$w" read 64k) ;;
		write-64k) iops=$(fio_run "$w" write 64k) ;;
		read-512k) iops=$(fio_run "$w" read 512k) ;;
		write-512k) iops=$(fio_run "$w" write 512k) ;;
		esac
		down "$t"
		echo "RESULT $r $t $w $iops" | tee -a "$R"
	done
}

# Peers alternate with us, workload by workload.
for r in $(seq "$rounds"); do
	for t in qcow2-q1 nbd loop raw null qcow2-q2 qcow2-empty nbd-empty; do
		workloads "$t" "$r"
	done
done

# Memory: a 1 TiB image with 4 KiB clusters (an L2 table per 2 MiB) written at
# random all over, then read: far more L2 tables than the cache holds.
cache_mb=4
qemu-img create -q -f qcow2 -o cluster_size=4k "$W/big.qcow2" 1T
if ublk_up -q 1 --cache-size "${cache_mb}M" "$W/big.qcow2"; then
	fio --name=big --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=32 \
		--rw=randwrite --bs=4k --time_based --runtime="$runtime" --minimal >/dev/null 2>&1
	fio --name=big --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=32 \
		--rw=randread --bs=4k --time_based --runtime="$runtime" --minimal >/dev/null 2>&1
	hwm=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$PID/status")
	echo "BIGRSS $hwm $((cache_mb * 1024)) $(du -k "$W/big.qcow2" | cut -f1)" | tee -a "$R"
	"$B" del -n "$ID"
fi
umount "$W"
exit 0
