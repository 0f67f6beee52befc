#!/bin/sh
# SPDX-License-Identifier: MIT
# Guest side of kernel/demo.sh: serve /data/disk.qcow2 as a ublk block device,
# make an ext4 file system on it, write a file, take it all down again.
set -eu
run() { printf '\n(vm) $ %s\n' "$*"; "$@"; }

run ublk-qcow2 features || true
printf '\n(vm) $ ublk-qcow2 add /data/disk.qcow2\n'
dev=$(ublk-qcow2 add /data/disk.qcow2 | tail -n1)
echo "$dev"
case $dev in /dev/ublkb[0-9]*) ;; *) echo "demo: add printed '$dev', not /dev/ublkbN" >&2; exit 1 ;; esac
i=0
while [ ! -b "$dev" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
run ublk-qcow2 list
run mkfs.ext4 -q "$dev"
run mount -t ext4 "$dev" /mnt
printf '\n(vm) $ echo ... > /mnt/hello.txt\n'
echo "hello from ublk-qcow2 on Linux $(uname -r)" >/mnt/hello.txt
run ls -l /mnt
run df -h /mnt
run umount /mnt
run ublk-qcow2 del -a
test ! -b "$dev"
echo
echo "(vm) done: $dev is gone"
