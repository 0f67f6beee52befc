# SPDX-License-Identifier: MIT
# Guest-side sanity check of the test-kernel kit (run by kernel/selftest.sh through
# vm-run.sh; busybox sh, cwd /data). Writes /data/sanity.txt.
set -eu
t0=$(cut -d' ' -f1 /proc/uptime)
step() { echo "== $*"; }
out=/data/sanity.txt
echo "kernel=$(uname -r) flavour=${UQ_KERNEL:-?}" >"$out"

echo "module load times (guest uptime at each insmod):"
cat /run/uqvm-modules.log
step "ublk_drv loaded, /dev/ublk-control present"
grep -q '^ublk_drv ' /proc/modules
test -c /dev/ublk-control
ls -l /dev/ublk-control
step "module reload (rmmod + modprobe)"
rmmod ublk_drv
modprobe ublk_drv
test -c /dev/ublk-control
echo "ublk=ok" >>"$out"

step "loop device over a file in /data"
truncate -s 512M /data/loop.img
dev=$(losetup -f --show /data/loop.img)
echo "loop device: $dev"
step "mkfs.ext4 + mount + write + e2fsck"
mkfs.ext4 -q -F "$dev"
mount -t ext4 "$dev" /mnt
dd if=/dev/urandom of=/mnt/file bs=1M count=8 2>/dev/null
sum1=$(sha256sum /mnt/file | cut -d' ' -f1)
umount /mnt
mount -t ext4 "$dev" /mnt
test "$(sha256sum /mnt/file | cut -d' ' -f1)" = "$sum1"
umount /mnt
e2fsck -fn "$dev" >/dev/null
echo "ext4=ok" >>"$out"
step "mkfs.xfs + mount + write + xfs_repair -n"
mkfs.xfs -q -f "$dev"
mount -t xfs "$dev" /mnt
cp /data/sanity.txt /mnt/copy
sync
umount /mnt
xfs_repair -n "$dev" >/dev/null 2>&1
echo "xfs=ok" >>"$out"
losetup -d "$dev"
rm -f /data/loop.img

step "fio (libaio and io_uring, direct, verify=crc32c)"
for eng in libaio io_uring; do
	fio --name=sanity-$eng --filename=/data/fio.dat --size=32M --bs=4k --rw=randwrite \
		--ioengine=$eng --direct=1 --iodepth=16 --verify=crc32c --verify_state_save=0 --output-format=terse \
		--terse-version=3 >/tmp/fio.$eng
	echo "fio $eng: write IOPS $(cut -d';' -f49 /tmp/fio.$eng)"
done
rm -f /data/fio.dat
echo "fio=ok" >>"$out"

step "qemu-img + qemu-nbd (nbd module)"
qemu-img create -q -f qcow2 /data/nbd.qcow2 256M
qemu-nbd --fork -c /dev/nbd0 -f qcow2 --cache=none --aio=native /data/nbd.qcow2
i=0
while [ "$(cat /sys/block/nbd0/size)" = 0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
mkfs.ext4 -q -F /dev/nbd0
mount -t ext4 /dev/nbd0 /mnt
echo nbd >/mnt/f
umount /mnt
qemu-nbd -d /dev/nbd0 >/dev/null
sleep 0.5
qemu-img check -q /data/nbd.qcow2
echo "nbd=ok" >>"$out"

if command -v ublk-qcow2 >/dev/null; then
	step "ublk-qcow2 present"
	ls -l "$(command -v ublk-qcow2)"
	echo "ublk-qcow2=present" >>"$out"
fi
t1=$(cut -d' ' -f1 /proc/uptime)
echo "sanity checks took $(awk -v a="$t1" -v b="$t0" 'BEGIN { print a - b }')s (guest clock)"
echo "all=ok" >>"$out"
