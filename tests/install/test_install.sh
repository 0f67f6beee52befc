#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# cmake --install into a temporary prefix, then check what landed there:
# the binary, a man page for every command (rendered without warnings, each
# naming every option its --help names), the bash completion, the systemd
# unit, the public header alone (never internal.h), the pkg-config file,
# and libqcow2 exporting exactly qcow2.h's functions; then build a small C
# program against the installed library through pkg-config, run it and
# judge its image with qemu-img check and qemu-io.
#
#   tests/install/test_install.sh BUILD_DIR
#
# Exit: 0 pass, 1 fail, 77 skipped (a tool it needs is missing).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
build=$(cd "${1:?usage: test_install.sh BUILD_DIR}" && pwd)

skip() { echo "SKIP: $*"; exit 77; }
for t in cmake pkg-config cc qemu-img qemu-io nm; do
	command -v "$t" >/dev/null || skip "$t not found"
done
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/uq-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix
cmake --install "$build" --prefix "$prefix" >"$tmp/install.log" ||
	{ cat "$tmp/install.log"; echo "FAIL: cmake --install"; exit 1; }

bin=$prefix/bin/ublk-qcow2
[ -x "$bin" ] || fail "no $bin"
"$bin" --help >"$tmp/help" || fail "ublk-qcow2 --help exited $?"
cmds=$(sed -n '/^commands:/,/^$/s/^  \([a-z]*\) .*/\1/p' "$tmp/help")
[ "$(echo "$cmds" | wc -w)" -ge 10 ] || fail "too few commands in --help: $cmds"

# ---- man pages ---------------------------------------------------------
mandir=$prefix/share/man/man1
[ -f "$mandir/ublk-qcow2.1" ] || fail "no ublk-qcow2.1"
render() { # PAGE: render with every warning on; warnings fail
	local out
	if command -v groff >/dev/null; then
		out=$(groff -ww -z -man "$1" 2>&1) || fail "$1: groff failed"
	else
		out=$(LC_ALL=C.UTF-8 man --warnings -l "$1" 2>&1 >/dev/null) || fail "$1: man -l failed"
	fi
	[ -z "$out" ] || fail "$1: $out"
}
page_text() { # PAGE: the page as plain text (troff escapes gone)
	if command -v groff >/dev/null; then
		groff -man -Tutf8 -P-c -P-b -P-u "$1" 2>/dev/null | sed 's/‐/-/g; s/−/-/g'
	else
		sed 's/\\-/-/g; s/\\f[BIRP]//g' "$1"
	fi
}
render "$mandir/ublk-qcow2.1"
for c in $cmds; do
	page=$mandir/ublk-qcow2-$c.1
	if [ ! -f "$page" ]; then
		fail "command $c has no man page"
		continue
	fi
	render "$page"
	grep -q "^\.BR ublk-qcow2-$c (1)" "$mandir/ublk-qcow2.1" || fail "ublk-qcow2.1 does not list $c"
	# every option the command's --help names is in its page
	page_text "$page" >"$tmp/page.txt"
	"$bin" "$c" --help >"$tmp/chelp" 2>&1 || fail "$c --help exited $?"
	for o in $(grep -oE '(^| |\[)--?[a-zA-Z][a-zA-Z-]*' "$tmp/chelp" | tr -d ' [' | sort -u); do
		grep -qe "$o" "$tmp/page.txt" || fail "ublk-qcow2-$c.1 lacks option $o"
	done
done
for page in "$mandir"/ublk-qcow2-*.1; do
	c=${page##*/ublk-qcow2-}
	c=${c%.1}
	echo "$cmds" | grep -qx "$c" || fail "man page $page names no command"
done

# ---- bash completion, systemd unit --------------------------------------
comp=$prefix/share/bash-completion/completions/ublk-qcow2
if [ -f "$comp" ]; then
	bash -n "$comp" || fail "$comp: syntax"
	out=$(bash -c '. "$1"; complete -p ublk-qcow2' _ "$comp") || fail "$comp: no complete"
	echo "$out" | grep -q _ublk_qcow2 || fail "$comp registers $out"
	# what completing "ublk-qcow2 <TAB>" and "ublk-qcow2 check --o<TAB>" offers
	got=$(bash -c '. "$1"; COMP_WORDS=(ublk-qcow2 ""); COMP_CWORD=1; _ublk_qcow2; echo "${COMPREPLY[*]}"' _ "$comp")
	for c in $cmds; do
		echo " $got " | grep -q " $c " || fail "completion does not offer $c"
	done
	got=$(bash -c '. "$1"; COMP_WORDS=(ublk-qcow2 check --o); COMP_CWORD=2; _ublk_qcow2; echo "${COMPREPLY[*]}"' _ "$comp")
	[ "$got" = "--output= --object" ] || fail "completion of 'check --o': '$got'"
	# bash splits "--output=j" at '=' by default
	got=$(bash -c '. "$1"; COMP_WORDS=(ublk-qcow2 map --output = j); COMP_CWORD=4; _ublk_qcow2; echo "${COMPREPLY[*]}"' _ "$comp")
	[ "$got" = json ] || fail "completion of 'map --output=j': '$got'"
else
	fail "no $comp"
fi
unit=$prefix/lib/systemd/system/ublk-qcow2@.service
if [ -f "$unit" ]; then
	grep -qx "ExecStart=$bin add --foreground \$OPTIONS \${IMAGE}" "$unit" ||
		fail "$unit: ExecStart is $(grep ExecStart "$unit")"
	grep -qx 'EnvironmentFile=/etc/ublk-qcow2/%i.conf' "$unit" || fail "$unit: EnvironmentFile"
	if command -v systemd-analyze >/dev/null; then
		cp "$unit" "$tmp/ublk-qcow2@.service"
		out=$(cd "$tmp" && systemd-analyze verify --man=no "./ublk-qcow2@.service" 2>&1 |
			grep -v 'Failed to .*bus\|not running\|offline' || true)
		[ -z "$out" ] || fail "systemd-analyze verify: $out"
	fi
else
	fail "no $unit"
fi
[ -f "$prefix/share/doc/ublk-qcow2/example.conf" ] || fail "no example.conf"

# ---- libqcow2: header, pkg-config, exports, a program using it ----------
[ -f "$prefix/include/ublk-qcow2/qcow2.h" ] || fail "no include/ublk-qcow2/qcow2.h"
leaked=$(find "$prefix" -name 'internal.h' -o -name '*.map' -o -name 'libqcow2.a')
[ -z "$leaked" ] || fail "installed what stays private: $leaked"
pc=$(find "$prefix" -name libqcow2.pc)
[ -n "$pc" ] || { fail "no libqcow2.pc"; pc=/nonexistent; }
export PKG_CONFIG_PATH=${pc%/*}
so=$(find "$prefix" -name 'libqcow2.so.0' | head -n 1)
[ -n "$so" ] || fail "no libqcow2.so.0"
if [ -n "$so" ]; then
	want=$(sed -n 's/^[a-z].*\b\(qcow2_[a-z0-9_]*\)(.*/\1/p' "$prefix/include/ublk-qcow2/qcow2.h" | sort -u)
	have=$(nm -D --defined-only "$so" | awk '$2 == "T" { print $3 }' | sed 's/@.*//' | sort -u)
	[ "$want" = "$have" ] || fail "libqcow2 exports differ from qcow2.h: $(diff <(echo "$want") <(echo "$have") | grep '^[<>]' | tr '\n' ' ')"
fi
cflags=$(pkg-config --cflags libqcow2) || fail "pkg-config --cflags libqcow2"
libs=$(pkg-config --libs libqcow2) || fail "pkg-config --libs libqcow2"
san=
[ "${UQ_SANITIZE:-0}" = 1 ] && san="-fsanitize=address,undefined"
# shellcheck disable=SC2086
if cc -std=c11 -Wall -Wextra -Werror $san $cflags -o "$tmp/demo" "$here/libqcow2_demo.c" $libs; then
	export LD_LIBRARY_PATH=${so%/*}
	if "$tmp/demo" "$tmp/demo.qcow2"; then
		qemu-img check -q "$tmp/demo.qcow2" || fail "qemu-img check of the demo's image"
		out=$(qemu-io -r -f qcow2 -c "read -P 0x5a 5246976 192k" -c "read -P 0 0 5246976" \
			"$tmp/demo.qcow2") || fail "qemu-io on the demo's image"
		echo "$out" | grep -q "Pattern verification failed" && fail "demo's data: $out"
		[ "$(qemu-img info --output=json "$tmp/demo.qcow2" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p')" = 67108864 ] ||
			fail "demo's image is not 64 MiB"
	else
		fail "the libqcow2 demo program failed"
	fi
else
	fail "cannot build a program against the installed libqcow2 ($cflags / $libs)"
fi

if [ "$failures" -ne 0 ]; then
	echo "FAIL: $failures problems"
	exit 1
fi
echo "PASS: install into $prefix: $(echo $cmds | wc -w) commands with man pages, completion, unit, libqcow2"
