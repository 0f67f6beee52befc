# SPDX-License-Identifier: MIT
# What the guest halves of the VM benchmarks (vm-guest.sh, vm-probe-guest.sh)
# share; bench/vm.sh and bench/vm-probe.sh put it in /data beside them.
#
#   TMPFS_MB=N; . ./vm-guest-lib.sh
#       sets B, R, W; empties R and mounts a tmpfs of N MiB on W (the images
#       live there, so that the VM's emulated disk does not set the pace);
#       with FS=brd an ext4 on a RAM disk of N MiB instead (brd.ko is in the
#       initramfs, not loaded at boot)

B=ublk-qcow2
R=/data/results
W=/bench
: >"$R"
mkdir -p "$W"
case ${FS:-tmpfs} in
brd)
	insmod "/lib/modules/$(uname -r)/brd.ko" rd_nr=1 rd_size=$((TMPFS_MB * 1024)) || exit 1
	mkfs.ext4 -q -F /dev/ram0 && mount -t ext4 /dev/ram0 "$W" || exit 1 ;;
*) mount -t tmpfs -o size="$TMPFS_MB"m tmpfs "$W" || exit 1 ;;
esac

DEV='' ID='' PID=''

ublk_up() { # ARGS...: serve with ublk-qcow2; sets DEV, ID, PID
	DEV=$("$B" add "$@") || return 1
	ID=${DEV#/dev/ublkb}
	i=0
	while [ ! -b "$DEV" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
	PID=$("$B" list -n "$ID" --output=json | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' | head -n1)
	[ -b "$DEV" ]
}
