#!/bin/sh
# SPDX-License-Identifier: MIT
# The guest half of bench/vm-probe.sh: 4k random reads (or RW) only (fio as in
# vm-guest.sh), on a few variants that tell where a qcow2 device's time goes.
# One line per variant on /data/results: RESULT VARIANT IOPS
#
#   vm-probe-guest.sh RUNTIME SIZE_MB VARIANT...

runtime=$1 size=$2
shift 2
TMPFS_MB=$((size * 4 + 256))
. ./vm-guest-lib.sh

fio_run() { # DEV: 4k IOPS (random reads, or RW's pattern)
	if [ -n "${PERF:-}" ]; then
		# a whole-guest profile of the run (cpu-clock: under -icount, guest instructions)
		set -- "$1" perf record -q -a -e cpu-clock -o /tmp/perf.data --
	else
		set -- "$1"
	fi
	fdev=$1
	shift
	"$@" fio --name=probe --filename="$fdev" --direct=1 --ioengine=libaio \
		--iodepth=128 --iodepth_batch_submit=16 --iodepth_batch_complete_min=1 \
		--rw="${RW:-randread}" --bs=4k --size="${size}m" --numjobs=2 --offset_increment=$((size / 2))m \
		--group_reporting --time_based --runtime="$runtime" --ramp_time=1 \
		--minimal 2>/tmp/fio.err | awk -F';' '{ print $8 + $49 }'
	if [ -n "${PERF:-}" ]; then
		{
			perf report -i /tmp/perf.data --stdio --sort comm,dso 2>/dev/null | grep -v '^#' | head -n 20
			perf report -i /tmp/perf.data --stdio --sort comm,sym 2>/dev/null | grep -v '^#' | head -n 80
		} >"/data/perf-$v.txt"
	fi
}

ublk() { # ARGS...: add, fio, del; prints the IOPS and the daemon's io-wq workers
	ublk_up "$@" || { echo 0; return; }
	iops=$(fio_run "$DEV")
	# io_uring's workers (iou-wrk-*) that served the daemon's punted SQEs,
	# and how often they switched in, per read (a punted read costs 1 or more)
	wrk=0 sw=0
	for t in /proc/"$PID"/task/*; do
		case $(cat "$t/comm" 2>/dev/null) in iou-wrk*) ;; *) continue ;; esac
		wrk=$((wrk + 1))
		sw=$((sw + $(awk '/ctxt_switches/ { n += $2 } END { print n + 0 }' "$t/status")))
	done
	echo "$iops iou-wrk=$wrk switches/read=$(awk -v s="$sw" -v n="$iops" -v t="$runtime" \
		'BEGIN { printf "%.3f", s / (n * (t + 1) + 1) }')"
	"$B" del -n "$ID"
}

for v in "$@"; do
	case $v in
	# pre.qcow2 as vm-guest.sh makes it: data clusters fallocated, never written
	qcow2-falloc)
		[ -f "$W/pf.qcow2" ] || qemu-img create -q -f qcow2 -o preallocation=falloc "$W/pf.qcow2" "${size}M"
		iops=$(ublk -q 1 "$W/pf.qcow2") ;;
	# the same, every data cluster written (as raw.img is, by dd)
	qcow2-full)
		[ -f "$W/pw.qcow2" ] || qemu-img create -q -f qcow2 -o preallocation=full "$W/pw.qcow2" "${size}M"
		iops=$(ublk -q 1 "$W/pw.qcow2") ;;
	qcow2-full-q2) iops=$(ublk -q 2 "$W/pw.qcow2") ;;
	qcow2-full-nzc) iops=$(ublk -q 1 --no-zero-copy "$W/pw.qcow2") ;;
	qcow2-full-nuc) iops=$(ublk -q 1 --no-user-copy "$W/pw.qcow2") ;;
	# a fresh empty image of 4 KiB clusters: every 4k write of the first
	# seconds allocates a whole cluster (with UQ_PROBE_RW=randwrite)
	qcow2-e4k | qcow2-e4k-nzc)
		rm -f "$W/e4k.qcow2"
		qemu-img create -q -f qcow2 -o cluster_size=4096 "$W/e4k.qcow2" "${size}M"
		if [ "$v" = qcow2-e4k ]; then
			iops=$(ublk -q 1 "$W/e4k.qcow2")
		else
			iops=$(ublk -q 1 --no-zero-copy "$W/e4k.qcow2")
		fi ;;
	raw-written-nuc) iops=$(ublk -q 1 -f raw --no-user-copy "$W/rw.img") ;;
	raw-written | loop-written)
		[ -f "$W/rw.img" ] || dd if=/dev/zero of="$W/rw.img" bs=1M count="$size" status=none
		if [ "$v" = loop-written ]; then
			dev=$(losetup --direct-io=on -f --show "$W/rw.img")
			iops=$(fio_run "$dev")
			losetup -d "$dev"
		else
			iops=$(ublk -q 1 -f raw "$W/rw.img")
		fi ;;
	raw-written-nzc) iops=$(ublk -q 1 -f raw --no-zero-copy "$W/rw.img") ;;
	null) iops=$(ublk -q 1 -t null --size "${size}M") ;;
	null-q2) iops=$(ublk -q 2 -t null --size "${size}M") ;;
	raw-written-q2) iops=$(ublk -q 2 -f raw "$W/rw.img") ;;
	raw-falloc)
		[ -f "$W/rf.img" ] || fallocate -l "${size}M" "$W/rf.img"
		iops=$(ublk -q 1 -f raw "$W/rf.img") ;;
	*) iops=unknown ;;
	esac
	echo "RESULT $v $iops" | tee -a "$R"
done
umount "$W"
exit 0
