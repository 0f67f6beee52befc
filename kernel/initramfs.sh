#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Build the busybox initramfs for one test kernel.
#
#   kernel/initramfs.sh [--bin PATH] [--out FILE] KERNEL    KERNEL: 6.1 | 6.12 | sid | its KVER
#
# Contents: busybox-static (every applet not shadowed by a real program below;
# /bin/sh is dash, bash is there too), /init (mounts proc/sys/devtmpfs, loads
# the modules, mounts the data disk /dev/vda at /data, runs /etc/uqvm/cmd, powers
# off), the kernel's modules (virtio_pci/virtio_blk where modular, crc32c, ext4,
# xfs, loop, nbd, ublk_drv and their dependencies, decompressed, in load order),
# and these host programs with their shared libraries: dash, bash, mkfs.ext4 (mke2fs),
# e2fsck, mkfs.xfs, xfs_repair, fio, losetup, blkdiscard, qemu-img, qemu-io,
# qemu-nbd, sfdisk, and those $UQ_VM_PROGS names (space-separated paths). With
# --bin (or $UQ_BIN) also the ublk-qcow2 binary as /usr/bin/ublk-qcow2.
#
# The base archive (everything but --bin) is cached in kernel/out/KERNEL/base.cpio
# and rebuilt only when its inputs change. The result goes to --out (default
# kernel/out/KERNEL/initramfs.cpio) and its path is printed on stdout.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "$0")/lib.sh"

die() { echo "initramfs.sh: $*" >&2; exit 1; }

bin=${UQ_BIN:-}
out=
k=
while [ $# -gt 0 ]; do
	case $1 in
	--bin) bin=$2; shift 2 ;;
	--out) out=$2; shift 2 ;;
	-h | --help) awk 'NR > 2 && !/^#/ { exit } NR > 2 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
	-*) die "unknown option $1" ;;
	*) [ -z "$k" ] || die "one kernel only"; k=$1; shift ;;
	esac
done
[ -n "$k" ] || die "usage: initramfs.sh [--bin PATH] [--out FILE] 6.1|6.12|sid"
kdir=$(kernel_dir "$k") || die "no kernel $k"
k=${kdir##*/}
kver=$(cat "$kdir/kver")
mods=$kdir/modules
odir=$kout/$k
mkdir -p "$odir"
out=${out:-$odir/initramfs.cpio}

# modules wanted (must load) and optional ones (loaded when present)
want_mods=(virtio_pci virtio_blk loop nbd ext4 xfs ublk_drv)
opt_mods=(crc32c_generic crc32c-intel)
# copied but not loaded at boot: the benchmarks load brd with their own size
lazy_mods=(brd)
# host programs, copied to the same path with their libraries
progs=(
	/usr/bin/dash /usr/bin/bash
	/usr/sbin/mke2fs /usr/sbin/e2fsck /usr/sbin/tune2fs /usr/sbin/mkfs.xfs
	/usr/sbin/xfs_repair /usr/bin/fio /usr/sbin/losetup /usr/sbin/blkdiscard
	/usr/bin/qemu-img /usr/bin/qemu-io /usr/bin/qemu-nbd /usr/sbin/sfdisk
)
# more, for a one-off look inside the guest (UQ_VM_PROGS="/usr/bin/perf /usr/bin/strace")
read -ra extra <<<"${UQ_VM_PROGS:-}"
progs+=("${extra[@]}")
busybox=$(command -v busybox || true)
if [ -z "$busybox" ] || ! { ldd "$busybox" 2>&1 || true; } | grep -q "not a dynamic"; then
	die "need a static busybox: run kernel/setup.sh (busybox-static)"
fi

# ---- cache key of the base archive (a re-fetch rewrites kver) ----
key=$( {
	echo "$kver" "${want_mods[@]}" "${opt_mods[@]}" "${lazy_mods[@]}" "${progs[@]}"
	stat -Lc '%s %Y' "$kdir/kver" "$busybox"
	cat "$0" "$kit/lib.sh"
	for p in "${progs[@]}"; do stat -Lc '%s %Y' "$p" 2>/dev/null || echo missing; done
	cat /etc/mke2fs.conf 2>/dev/null || true
} | sha256sum | cut -c1-16)
base=$odir/base.cpio

# one builder at a time per kernel (concurrent vm-run.sh calls share kernel/out)
exec 9>"$odir/.lock"
flock 9
if [ ! -s "$base" ] || [ "$(cat "$odir/base.key" 2>/dev/null)" != "$key" ]; then
	echo "initramfs.sh: building base initramfs for $k ($kver)" >&2
	# ---- module closure: modinfo -F depends (+ softdep pre:), dependencies first ----
	declare -A modpath=() seen=()
	while IFS= read -r f; do
		n=${f##*/}
		n=${n%%.ko*}
		modpath[${n//-/_}]=$f
	done < <(find -L "$mods/" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
	order=()
	# aliases that softdeps name and no module file carries
	alias_of() {
		case $1 in
		crypto-crc32c | crc32c) echo crc32c_generic crc32c_intel ;;
		*) echo "$1" ;;
		esac
	}
	visit() { # NAME REQUIRED
		local n=${1//-/_} d a f
		[ -z "${seen[$n]:-}" ] || return 0
		seen[$n]=1
		f=${modpath[$n]:-}
		if [ -z "$f" ]; then
			if [ "$2" = 1 ] && ! grep -qE "/${n//_/[-_]}\.ko" "$mods/modules.builtin" 2>/dev/null; then
				# not a module file: built in (virtio_pci on 6.12+), or missing
				echo "initramfs.sh: $k: no module $n (assuming built in)" >&2
			fi
			return 0
		fi
		for d in $(modinfo -F softdep "$f" | tr ' ' '\n' | sed -n '/^pre:$/,/^post:$/p' |
			grep -vE '^(pre|post):$' || true); do
			for a in $(alias_of "$d"); do visit "$a" 0; done
		done
		for d in $(modinfo -F depends "$f" | tr ',' ' '); do visit "$d" 1; done
		order+=("$n")
	}
	for m in "${opt_mods[@]}" "${lazy_mods[@]}"; do visit "$m" 0; done
	for m in "${want_mods[@]}"; do visit "$m" 1; done
	[ -n "${modpath[ublk_drv]:-}" ] || die "$k: no ublk_drv module in $mods (run kernel/fetch.sh --update $k)"

	root=$(mktemp -d "$odir/root.XXXXXX")
	trap 'rm -rf "$root"' EXIT
	mkdir -p "$root"/usr/{bin,sbin,lib,lib64} "$root"/{proc,sys,dev,tmp,run,data,root,mnt,etc/uqvm,var/tmp}
	ln -s /run "$root/var/run"
	ln -s /run/lock "$root/var/lock"
	for d in bin sbin lib lib64; do ln -s "usr/$d" "$root/$d"; done
	chmod 1777 "$root/tmp"

	# host programs first: busybox applets only fill the gaps
	for p in "${progs[@]}"; do
		if [ -x "$p" ]; then copy_exe "$root" "$p" "$p"; else
			echo "initramfs.sh: warning: $p not found (run kernel/setup.sh)" >&2
		fi
	done
	for l in mkfs.ext4 mkfs.ext3 mkfs.ext2; do
		[ -e "$root/usr/sbin/mke2fs" ] && ln -sf mke2fs "$root/usr/sbin/$l"
	done
	for l in fsck.ext4 fsck.ext3 fsck.ext2; do
		[ -e "$root/usr/sbin/e2fsck" ] && ln -sf e2fsck "$root/usr/sbin/$l"
	done
	[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
	# /bin/sh is dash, as on Debian: busybox's own sh runs its applets in preference
	# to the real programs in PATH (its losetup instead of util-linux's, ...)
	ln -s dash "$root/usr/bin/sh"

	cp "$busybox" "$root/usr/bin/busybox"
	"$busybox" --list-full | while read -r a; do
		# the list names busybox itself: never link it onto itself
		[ "${a##*/}" = busybox ] && continue
		a=${a#/}
		case $a in bin/* | sbin/*) a=usr/$a ;; esac
		[ -e "$root/$a" ] || [ -L "$root/$a" ] || ln -s /usr/bin/busybox "$root/$a"
	done

	# modules, decompressed (busybox insmod reads plain .ko only)
	mdir=$root/usr/lib/modules/$kver
	mkdir -p "$mdir"
	for n in "${order[@]}"; do
		f=${modpath[$n]}
		case $f in
		*.ko.xz) xz -dc "$f" >"$mdir/$n.ko" ;;
		*.ko.zst) zstd -qdc "$f" >"$mdir/$n.ko" ;;
		*.ko.gz) gzip -dc "$f" >"$mdir/$n.ko" ;;
		*) cp "$f" "$mdir/$n.ko" ;;
		esac
		deps=$(modinfo -F depends "$f" | tr ',' '\n' | sed '/^$/d; s/-/_/g; s/$/.ko/' | tr '\n' ' ')
		echo "$n.ko: $deps" >>"$mdir/modules.dep" # for busybox modprobe
	done
	printf '%s\n' "${order[@]}" | grep -vxF -f <(printf '%s\n' "${lazy_mods[@]}") >"$mdir/load-order"
	touch "$mdir/modules.alias" "$mdir/modules.symbols"

	cat >"$root/etc/passwd" <<-'EOF'
		root:x:0:0:root:/root:/bin/sh
		nobody:x:65534:65534:nobody:/nonexistent:/bin/false
	EOF
	printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
	echo uqvm >"$root/etc/hostname"
	ln -s /proc/mounts "$root/etc/mtab"

	cat >"$root/init" <<-'EOF'
		#!/bin/sh
		# uqvm init: set up, load modules, mount /data, run /etc/uqvm/cmd, power off
		export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin HOME=/root TERM=dumb
		mount -t proc proc /proc
		mount -t sysfs sysfs /sys
		mount -t devtmpfs devtmpfs /dev
		mkdir -p /dev/pts /dev/shm
		mount -t devpts devpts /dev/pts
		mount -t tmpfs tmpfs /dev/shm
		mount -t tmpfs tmpfs /tmp
		mount -t tmpfs tmpfs /run
		mkdir -p /run/lock
		mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
		mount -t configfs configfs /sys/kernel/config 2>/dev/null
		hostname uqvm
		echo 1 >/proc/sys/kernel/panic_on_oops
		ln -sf /proc/self/fd /dev/fd 2>/dev/null
		ln -sf /proc/self/fd/0 /dev/stdin 2>/dev/null
		ln -sf /proc/self/fd/1 /dev/stdout 2>/dev/null
		ln -sf /proc/self/fd/2 /dev/stderr 2>/dev/null
		read -r up _ </proc/uptime
		echo "uqvm: init at ${up}s, kernel $(uname -r)"
		m=/lib/modules/$(uname -r)
		while read -r mod; do
			read -r up _ </proc/uptime
			echo "$up $mod" >>/run/uqvm-modules.log
			insmod "$m/$mod.ko" 2>/tmp/insmod.err || {
				case $mod in crc32c_intel|crc32c_generic) ;; *)
				echo "uqvm: insmod $mod failed: $(cat /tmp/insmod.err)" ;; esac; }
		done <"$m/load-order"
		[ -e /dev/ublk-control ] || echo "uqvm: warning: no /dev/ublk-control"
		[ -f /etc/uqvm/env ] && . /etc/uqvm/env
		if [ -b /dev/vda ]; then
			mount -t ext4 /dev/vda /data || echo "uqvm: cannot mount /dev/vda on /data"
		fi
		read -r up _ </proc/uptime
		echo "uqvm: ready at ${up}s"
		cd /data 2>/dev/null || cd /
		if [ -f /etc/uqvm/cmd ]; then
			/bin/sh /etc/uqvm/cmd
			rc=$?
		elif [ -f /etc/uqvm/shell ]; then
			setsid cttyhack /bin/sh -l
			rc=$?
		else
			echo "uqvm: no /etc/uqvm/cmd to run"
			rc=125
		fi
		cd /
		# leftovers (a daemon the script left running) must not hold /data
		kill -TERM -1 2>/dev/null; sleep 0.5; kill -KILL -1 2>/dev/null
		sync
		if grep -q ' /data ' /proc/mounts && ! umount /data; then
			sleep 1; umount /data || { echo "uqvm: umount /data failed"; mount -o remount,ro /data; }
		fi
		read -r up _ </proc/uptime
		echo
		echo "@@UQVM-EXIT=$rc@@ at ${up}s"
		poweroff -f
	EOF
	chmod +x "$root/init"

	# uncompressed: under TCG the kernel needs ~9 s to gunzip it, and a plain
	# copy of ~110 MB is far quicker
	cpio_pack "$root" "$base.tmp"
	rm -rf "$root"
	mv "$base.tmp" "$base"
	echo "$key" >"$odir/base.key"
	echo "initramfs.sh: $base: $(du -h "$base" | cut -f1), modules: ${order[*]}" >&2
fi

# ---- the binary under test: a second cpio appended (the kernel unpacks both) ----
if [ -n "$bin" ]; then
	[ -x "$bin" ] || die "ublk-qcow2 binary '$bin' is not an executable (build it: cmake --build build)"
	broot=$(mktemp -d "$odir/bin.XXXXXX")
	trap 'rm -rf "$broot"' EXIT
	mkdir -p "$broot"/usr/{bin,lib,lib64}
	for d in lib lib64; do ln -s "usr/$d" "$broot/$d"; done
	copy_exe "$broot" "$bin" /usr/bin/ublk-qcow2
	rm "$broot"/{lib,lib64} # the base has these links; a cpio entry would replace them
	cpio_pack "$broot" "$broot.cpio"
	cat "$base" "$broot.cpio" >"$out.tmp.$$"
	rm -rf "$broot.cpio" "$broot"
	mv "$out.tmp.$$" "$out"
elif [ "$out" != "$base" ]; then
	cp "$base" "$out.tmp.$$"
	mv "$out.tmp.$$" "$out"
fi
echo "$out"
