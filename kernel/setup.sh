#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Install the host tools the test-kernel kit needs (Debian bookworm, as root).
# Safe to run again. The kernels themselves are NOT installed: fetch.sh downloads
# and unpacks them (and the matching 6.1 headers and source) under kernel/cache/.
set -euo pipefail

pkgs=(
	qemu-system-x86 qemu-utils        # the VM (TCG) and qemu-img/qemu-nbd
	busybox-static cpio kmod xz-utils # initramfs: shell, packing, modinfo, .ko.xz
	zstd binutils                     # unpacking vmlinux from vmlinuz, readelf
	e2fsprogs xfsprogs fio            # mkfs.ext4/debugfs, mkfs.xfs, fio
	build-essential bc                # out-of-tree ublk_drv for 6.1 (kbuild is prebuilt)
	util-linux apt dpkg ca-certificates
	fdisk                             # sfdisk: GPT partitions in the guest
)

if [ "$(id -u)" -ne 0 ]; then
	echo "kernel/setup.sh: run as root (sudo kernel/setup.sh)" >&2
	exit 1
fi

missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
	echo "kernel/setup.sh: all packages present"
	exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${missing[@]}"
