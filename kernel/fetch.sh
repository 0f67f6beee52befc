#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Fetch the Debian test kernels into kernel/cache/ (nothing is installed on the host).
#
#   kernel/fetch.sh [--update] [6.1|6.12|sid|all]...      (default: all)
#
#   6.12  trixie  linux-image-6.12.*-amd64-unsigned        (ships ublk_drv.ko.xz)
#   sid   sid     linux-binary-VER-amd64 + linux-modules-VER-amd64, newest VER
#   6.1   bookworm linux-image-6.1.0-N-amd64-unsigned      (no ublk module: ublk_drv is
#         built out of tree from linux-source-6.1 against linux-headers-6.1.0-N-amd64,
#         all three at the image's exact package version)
#
# A kernel already in the cache is not fetched again (second runs are offline);
# --update refreshes the package lists and moves to the newest versions.
#
# Result, per kernel K (see kernel/README.md):
#   kernel/cache/K/kver        the kernel release (uname -r)
#   kernel/cache/K/vmlinuz     the kernel image
#   kernel/cache/K/modules/    its /lib/modules/KVER tree (6.1: + extra/ublk_drv.ko)
# Apt uses a private configuration under kernel/cache/apt/ (the host's sources
# and lists are never touched), the .debs are kept in kernel/cache/debs/.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${UQ_KERNEL_CACHE:-$here/cache}
debs=$cache/debs

die() { echo "fetch.sh: $*" >&2; exit 1; }
log() { echo "fetch.sh: $*" >&2; }

update=0
want=()
for a in "$@"; do
	case $a in
	--update) update=1 ;;
	all) want+=(6.1 6.12 sid) ;;
	6.1 | 6.12 | sid) want+=("$a") ;;
	-h | --help) awk 'NR > 2 && !/^#/ { exit } NR > 2 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
	*) die "unknown argument '$a' (want 6.1, 6.12, sid, all or --update)" ;;
	esac
done
[ "${#want[@]}" -gt 0 ] || want=(6.1 6.12 sid)

for t in apt-get apt-cache dpkg-deb dpkg xz make gcc; do
	command -v "$t" >/dev/null || die "missing '$t': run kernel/setup.sh as root"
done

# --- the Debian mirror the host already uses -----------------------------------
host_uris() {
	cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
		/etc/apt/sources.list.d/*.sources 2>/dev/null |
		grep -vE '^[[:space:]]*#' | grep -oE 'https?://[^[:space:]]+' || true
}
mirror=${UQ_DEBIAN_MIRROR:-$(host_uris | grep -E '/debian/?$' | head -n1)}
mirror=${mirror:-http://deb.debian.org/debian}
mirror=${mirror%/}
secmirror=${UQ_DEBIAN_SECURITY_MIRROR:-$(host_uris | grep -E '/debian-security/?$' | head -n1)}
secmirror=${secmirror:-${mirror%/debian}/debian-security}
secmirror=${secmirror%/}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

# --- a private apt per suite set -----------------------------------------------
# apt_setup NAME LINE...: writes cache/apt/NAME/sources.list; sets APT_OPTS
apt_setup() {
	local name=$1 d
	shift
	d=$cache/apt/$name
	mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$d/prefs.d"
	printf '%s\n' "$@" >"$d/sources.list.new"
	if ! cmp -s "$d/sources.list.new" "$d/sources.list" 2>/dev/null; then
		mv "$d/sources.list.new" "$d/sources.list"
		rm -f "$d/updated"
	else
		rm -f "$d/sources.list.new"
	fi
	APT_OPTS=(
		-o "Dir::Etc::sourcelist=$d/sources.list" -o "Dir::Etc::sourceparts=-"
		-o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d/cache"
		-o "Dir::Etc::preferencesparts=$d/prefs.d" -o "Dir::Etc::preferences=$d/prefs"
		-o "Acquire::Languages=none" -o "APT::Sandbox::User=root"
		-o "Debug::NoLocking=1" -q
	)
	if [ "$update" = 1 ] || [ ! -e "$d/updated" ]; then
		log "apt-get update ($name)"
		apt-get "${APT_OPTS[@]}" update >"$d/update.log" 2>&1 ||
			{ cat "$d/update.log" >&2; die "apt-get update failed for $name"; }
		touch "$d/updated"
	fi
}
deb_line() { echo "deb [arch=amd64 signed-by=$keyring] $1 $2 main"; }

# newest package name matching an ERE among the package names starting with PREFIX
newest_pkg() {
	apt-cache "${APT_OPTS[@]}" pkgnames "$1" | grep -E "$2" | sort -V | tail -n1
}
candidate() {
	apt-cache "${APT_OPTS[@]}" policy "$1" | awk '/Candidate:/ {print $2; exit}'
}
# download PKG=VER... into cache/debs (skips files already there)
download() {
	local spec p v f
	mkdir -p "$debs"
	for spec in "$@"; do
		p=${spec%%=*} v=${spec#*=}
		f=$(deb_file "$p" "$v")
		if [ -s "$debs/$f" ]; then continue; fi
		log "apt-get download $p=$v"
		(cd "$debs" && apt-get "${APT_OPTS[@]}" download "$p=$v" >/dev/null) ||
			die "apt-get download $p=$v failed"
		[ -s "$debs/$f" ] || die "downloaded $p=$v but $debs/$f is missing"
	done
}
# the file name apt-get download gives PKG VER (epoch ':' becomes '%3a')
deb_file() { echo "${1}_${2//:/%3a}_$(arch_of "$1" "$2").deb"; }
arch_of() {
	apt-cache "${APT_OPTS[@]}" show "$1=$2" 2>/dev/null |
		awk '/^Architecture:/ {print $2; exit}'
}

# finish K ROOT: find the kernel release, vmlinuz and modules in ROOT; link them
finish() {
	local k=$1 root=$2 mdir kver vmlinuz
	mdir=$(find "$root/lib/modules" "$root/usr/lib/modules" -mindepth 1 -maxdepth 1 \
		-type d 2>/dev/null | head -n1 || true)
	[ -n "$mdir" ] || die "$k: no lib/modules/KVER in the unpacked packages"
	kver=${mdir##*/}
	for vmlinuz in "$root/boot/vmlinuz-$kver" "$mdir/vmlinuz" ""; do
		[ -z "$vmlinuz" ] || [ -f "$vmlinuz" ] && break
	done
	[ -n "$vmlinuz" ] || die "$k: no vmlinuz for $kver in the unpacked packages"
	ln -sfn "${vmlinuz#"$cache/$k/"}" "$cache/$k/vmlinuz"
	ln -sfn "${mdir#"$cache/$k/"}" "$cache/$k/modules"
	echo "$kver" >"$cache/$k/kver"
}

ready() { [ "$update" = 0 ] && have "$1"; }
have() { [ -s "$cache/$1/kver" ] && [ -e "$cache/$1/vmlinuz" ] &&
	[ -n "$(find -L "$cache/$1/modules/" -name 'ublk_drv.ko*' -print -quit 2>/dev/null)" ]; }

# same K SPEC...: cache/K already holds exactly these packages (--update: nothing new)
same() {
	local k=$1
	shift
	have "$k" && [ "$(printf '%s\n' "$@")" = "$(cat "$cache/$k/packages" 2>/dev/null)" ] &&
		log "$k: newest is still $(printf '%s ' "$@")"
}

# unpack K DEB...: fresh cache/K/root from the given .debs
unpack() {
	local k=$1 f
	shift
	rm -rf "$cache/$k.new"
	mkdir -p "$cache/$k.new/root"
	for f in "$@"; do
		dpkg-deb -x "$debs/$f" "$cache/$k.new/root"
	done
	rm -rf "${cache:?}/$k"
	mv "$cache/$k.new" "$cache/$k"
}

# --- trixie 6.12 -----------------------------------------------------------------
fetch_612() {
	local p v
	apt_setup trixie "$(deb_line "$mirror" trixie)"
	p=$(newest_pkg linux-image-6.12 '^linux-image-6\.12\.[0-9][^-]*-amd64-unsigned$')
	[ -n "$p" ] || die "6.12: no linux-image-6.12.*-amd64-unsigned in trixie"
	v=$(candidate "$p")
	! same 6.12 "$p=$v" || return 0
	download "$p=$v"
	unpack 6.12 "$(deb_file "$p" "$v")"
	echo "$p=$v" >"$cache/6.12/packages"
	finish 6.12 "$cache/6.12/root"
}

# --- sid, newest -----------------------------------------------------------------
fetch_sid() {
	local p ver v
	apt_setup sid "$(deb_line "$mirror" sid)"
	p=$(newest_pkg linux-binary- '^linux-binary-[0-9][^-]*-amd64$')
	[ -n "$p" ] || die "sid: no linux-binary-VER-amd64 in sid"
	ver=${p#linux-binary-}
	v=$(candidate "$p")
	[ -n "$(candidate "linux-modules-$ver")" ] || die "sid: linux-modules-$ver not in sid"
	! same sid "$p=$v" "linux-modules-$ver=$(candidate "linux-modules-$ver")" || return 0
	download "$p=$v" "linux-modules-$ver=$(candidate "linux-modules-$ver")"
	unpack sid "$(deb_file "$p" "$v")" \
		"$(deb_file "linux-modules-$ver" "$(candidate "linux-modules-$ver")")"
	printf '%s\n' "$p=$v" "linux-modules-$ver=$(candidate "linux-modules-$ver")" \
		>"$cache/sid/packages"
	finish sid "$cache/sid/root"
}

# --- bookworm 6.1 + out-of-tree ublk_drv ----------------------------------------
fetch_61() {
	local p abi v kver hdr src b
	apt_setup bookworm "$(deb_line "$mirror" bookworm)" "$(deb_line "$mirror" bookworm-updates)" \
		"$(deb_line "$secmirror" bookworm-security)"
	p=$(newest_pkg linux-image-6.1.0 '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$')
	[ -n "$p" ] || die "6.1: no linux-image-6.1.0-*-amd64-unsigned in bookworm"
	abi=${p#linux-image-}
	abi=${abi%-amd64-unsigned} # 6.1.0-N
	v=$(candidate "$p")
	local pkgs=("$p=$v" "linux-headers-$abi-amd64=$v" "linux-headers-$abi-common=$v"
		"linux-kbuild-6.1=$v" "linux-source-6.1=$v")
	! same 6.1 "${pkgs[@]}" || return 0
	download "${pkgs[@]}"
	unpack 6.1 "$(deb_file "$p" "$v")"
	printf '%s\n' "${pkgs[@]}" >"$cache/6.1/packages"
	finish 6.1 "$cache/6.1/root"
	kver=$(cat "$cache/6.1/kver")

	# headers + kbuild unpacked side by side: their relative symlinks resolve there
	hdr=$cache/6.1/headers
	mkdir -p "$hdr"
	for b in "linux-headers-$abi-amd64" "linux-headers-$abi-common" linux-kbuild-6.1; do
		dpkg-deb -x "$debs/$(deb_file "$b" "$v")" "$hdr"
	done
	local kdir=$hdr/usr/src/linux-headers-$kver
	[ -f "$kdir/Makefile" ] || die "6.1: $kdir/Makefile missing"
	# Debian's arch Makefile includes the -common tree by absolute path: point it here
	sed -i "s|/usr/src/linux-headers-$abi-common|$hdr/usr/src/linux-headers-$abi-common|g" \
		"$kdir/Makefile"

	# ublk_drv.c from the matching source tarball (streamed, only that file)
	src=$cache/6.1/ublk
	mkdir -p "$src"
	log "extracting drivers/block/ublk_drv.c from linux-source-6.1 $v"
	dpkg-deb --fsys-tarfile "$debs/$(deb_file linux-source-6.1 "$v")" 2>/dev/null |
		tar -xO --wildcards './usr/src/linux-source-6.1.tar.*' |
		xz -dc | tar -xO --occurrence=1 --wildcards '*/drivers/block/ublk_drv.c' \
		>"$src/ublk_drv.c" || true
	[ -s "$src/ublk_drv.c" ] || die "6.1: could not extract ublk_drv.c"
	echo 'obj-m := ublk_drv.o' >"$src/Kbuild"
	log "building ublk_drv.ko for $kver"
	make -C "$kdir" M="$src" modules >"$src/build.log" 2>&1 ||
		{ cat "$src/build.log" >&2; die "6.1: building ublk_drv.ko failed"; }
	mkdir -p "$cache/6.1/modules/extra"
	cp "$src/ublk_drv.ko" "$cache/6.1/modules/extra/ublk_drv.ko"
	local vm
	vm=$(modinfo -F vermagic "$src/ublk_drv.ko")
	case $vm in "$kver "*) ;; *) die "6.1: ublk_drv.ko vermagic '$vm' is not for $kver" ;; esac
}

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9 # one fetch at a time
for k in "${want[@]}"; do
	if ready "$k"; then
		log "$k: cached ($(cat "$cache/$k/kver"))"
		continue
	fi
	case $k in
	6.1) fetch_61 ;;
	6.12) fetch_612 ;;
	sid) fetch_sid ;;
	esac
	log "$k: ready ($(cat "$cache/$k/kver")) in $cache/$k"
done
