# shellcheck shell=bash
# SPDX-License-Identifier: MIT
# Shared helpers for the test-kernel kit (sourced by initramfs.sh and vm-run.sh).

kit=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
kcache=${UQ_KERNEL_CACHE:-$kit/cache}
# shellcheck disable=SC2034 # used by the scripts that source this
kout=${UQ_KERNEL_OUT:-$kit/out}

# kernel_dir NAME: the cache dir of a fetched kernel (6.1, 6.12, sid, or the
# kernel release of one of them), fetching it (kernel/fetch.sh) when it is not
# there yet
kernel_dir() {
	local k=$1 n
	case $k in
	6.1 | 6.12 | sid) ;;
	*)
		for n in 6.1 6.12 sid; do
			if [ "$(cat "$kcache/$n/kver" 2>/dev/null)" = "$k" ]; then
				echo "$kcache/$n"
				return 0
			fi
		done
		echo "unknown kernel '$k' (want 6.1, 6.12 or sid)" >&2
		return 1
		;;
	esac
	if [ ! -s "$kcache/$k/kver" ] || [ ! -e "$kcache/$k/vmlinuz" ]; then
		"$kit/fetch.sh" "$k" >&2 || return 1
	fi
	echo "$kcache/$k"
}

# kernel_image KDIR: what qemu should boot. The uncompressed ELF vmlinux (PVH
# entry) when it can be had: under TCG the bzImage's own xz/zstd decompression
# costs 3-8 s a boot. Extracted once into KDIR/vmlinux; else KDIR/vmlinuz.
kernel_image() {
	local kd=$1 z=$1/vmlinuz v=$1/vmlinux off t m
	if [ "${UQ_VM_BZIMAGE:-0}" != 1 ] && [ ! -s "$v" ] && command -v readelf >/dev/null; then
		(
			flock 8
			[ -s "$v" ] && exit 0
			for m in 'xz:\xfd7zXZ\x00' 'zstd:\x28\xb5\x2f\xfd' 'gzip:\x1f\x8b\x08'; do
				t=${m%%:*}
				command -v "$t" >/dev/null || continue
				for off in $(LC_ALL=C grep -obUaP "${m#*:}" "$z" | cut -d: -f1 | head -n 4); do
					tail -c +$((off + 1)) "$z" | "$t" -dc 2>/dev/null >"$v.tmp" || true
					# an ELF with the PVH entry note (Xen note type 0x12)
					if [ "$(head -c 4 "$v.tmp" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] &&
						readelf -n "$v.tmp" 2>/dev/null | grep -q 'Xen.*0x00000012\|Xen.*PHYS32_ENTRY'; then
						mv "$v.tmp" "$v"
						exit 0
					fi
				done
			done
			rm -f "$v.tmp"
			: >"$v" # none: an empty file says so
		) 8>"$kd/.vmlinux.lock"
	fi
	if [ "${UQ_VM_BZIMAGE:-0}" != 1 ] && [ -s "$v" ]; then echo "$v"; else echo "$z"; fi
}

# copy_exe ROOT SRC [DEST]: copy an executable (following links) to ROOT/DEST
# (default /usr/bin/NAME) with every shared library ldd names, at the same paths
copy_exe() {
	local root=$1 src=$2 dest=${3:-/usr/bin/${2##*/}} lib
	[ -x "$src" ] || { echo "copy_exe: $src is not an executable" >&2; return 1; }
	mkdir -p "$root${dest%/*}"
	cp -L "$src" "$root$dest"
	# "libfoo.so => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)"
	ldd "$src" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' |
		while read -r lib; do
			[ -e "$root$lib" ] && continue
			mkdir -p "$root${lib%/*}"
			cp -L "$lib" "$root$lib"
		done
}

# sq ARG: ARG single-quoted for a POSIX shell
sq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

# cpio_pack ROOT OUT: a newc cpio archive of ROOT, files owned by root
cpio_pack() {
	(cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$2"
}
