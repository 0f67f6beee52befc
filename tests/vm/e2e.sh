#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# End-to-end test of ublk-qcow2 on one test kernel: images made here with
# qemu-img/qemu-io, served in a kernel/vm-run.sh VM by tests/vm/guest.sh
# (ext4, xfs, fio verify, read-only, del and kill -9 during I/O, user
# recovery after kill -9), then
# checked here with qemu-img check.
#
#   tests/vm/e2e.sh KERNEL [SCENARIO...]      KERNEL: 6.1 | 6.12 | sid
#
# Exit: 0 pass, 1 fail, 77 skipped (no qemu, or the kernel cannot be fetched).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
k=${1:?usage: e2e.sh 6.1|6.12|sid [SCENARIO...]}
shift
bin=${UQ_BIN:-$top/build/ublk-qcow2}

skip() { echo "SKIP: $*"; exit 77; }
for t in qemu-img qemu-io qemu-system-x86_64; do
	command -v "$t" >/dev/null || skip "$t not found (kernel/setup.sh installs it)"
done
[ -x "$bin" ] || { echo "FAIL: no ublk-qcow2 binary at $bin"; exit 1; }
if ! fetch_log=$("$top/kernel/fetch.sh" "$k" 2>&1); then
	echo "$fetch_log" | tail -n 5
	skip "test kernel $k is not in kernel/cache and cannot be fetched"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/uq-e2e-$k.XXXXXX")
trap 'rm -rf "$work"' EXIT
data=$work/data
mkdir -p "$data"

qemu-img create -q -f qcow2 "$data/ext4.qcow2" 256M
qemu-img create -q -f qcow2 "$data/xfs.qcow2" 512M
qemu-img create -q -f qcow2 -o cluster_size=16k "$data/fio.qcow2" 1G
# an overlay (64k clusters) over a zstd-compressed base of varied data
truncate -s 128M "$work/cowbase.raw"
qemu-io -f raw -c "write -P 0x3c 0 40M" -c "write -P 0xc3 40M 30M" -c "write -P 0x17 90M 38M" \
	"$work/cowbase.raw" >/dev/null
qemu-img convert -c -O qcow2 -o compression_type=zstd "$work/cowbase.raw" "$data/cowbase.qcow2"
rm -f "$work/cowbase.raw"
cowbase_sum=$(md5sum <"$data/cowbase.qcow2")
qemu-img create -q -f qcow2 -b cowbase.qcow2 -F qcow2 "$data/cow.qcow2" 128M
qemu-img create -q -f qcow2 -b cowbase.qcow2 -F qcow2 "$data/gdcow.qcow2" 128M
# internal snapshots: s1 and s2 taken between writes, the active state differs
qemu-img create -q -f qcow2 -o cluster_size=16k "$data/snap.qcow2" 32M
qemu-io -f qcow2 -c "write -P 0x71 0 8M" -c "write -P 0x72 20M 100k" "$data/snap.qcow2" >/dev/null
qemu-img snapshot -c s1 "$data/snap.qcow2"
qemu-io -f qcow2 -c "write -P 0x73 4M 8M" -c "write -z 0 1M" "$data/snap.qcow2" >/dev/null
qemu-img snapshot -c s2 "$data/snap.qcow2"
qemu-io -f qcow2 -c "write -P 0x74 0 32M" "$data/snap.qcow2" >/dev/null
for s in s1 s2; do
	qemu-img convert -l "snapshot.name=$s" -O raw "$data/snap.qcow2" "$data/snap-$s.raw"
done
snap_sum=$(md5sum <"$data/snap.qcow2")
# extended L2 (64k clusters, 2k subclusters) over a filled base
qemu-img create -q -f qcow2 "$data/extl2base.qcow2" 128M
qemu-io -f qcow2 -c "write -P 0x6b 0 128M" "$data/extl2base.qcow2" >/dev/null
qemu-img create -q -f qcow2 -b extl2base.qcow2 -F qcow2 -o extended_l2=on \
	"$data/extl2.qcow2" 128M
# LUKS (aes-256-xts-plain64), a short key derivation for the test's sake;
# qemu-img's PBKDF2 timing fails now and then on a busy machine: retry
for i in 1 2 3 4 5; do
	qemu-img create -q -f qcow2 --object secret,id=sec0,data=uq-secret \
		-o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 \
		"$data/luks.qcow2" 128M && break
	sleep 1
done
luks_sum=$(md5sum <"$data/luks.qcow2")
qemu-img create -q -f qcow2 "$data/del.qcow2" 256M
qemu-img create -q -f qcow2 "$data/kill.qcow2" 256M
qemu-img create -q -f qcow2 "$data/recover.qcow2" 256M
# read-only: data, zero clusters, a partial cluster and the last cluster
qemu-img create -q -f qcow2 -o cluster_size=65536 "$data/ro.qcow2" 64M
qemu-io -f qcow2 -c "write -P 0xab 0 1M" -c "write -P 0x5c 3M 100k" \
	-c "write -z 8M 1M" -c "write -P 0x11 8M 4k" -c "write -P 0xee 63M 1M" \
	"$data/ro.qcow2" >/dev/null
qemu-img convert -O raw "$data/ro.qcow2" "$data/ro.raw"
ro_sum=$(md5sum <"$data/ro.qcow2")
qemu-img create -q -f qcow2 "$data/discard.qcow2" 64M
qemu-io -f qcow2 -c "write -P 0xab 0 4M" "$data/discard.qcow2" >/dev/null
qemu-img create -q -f qcow2 "$data/term.qcow2" 64M
qemu-img create -q -f qcow2 "$data/gpt.qcow2" 64M
# the systemd unit, as installed with the binary in /usr/bin, and its config
sed 's|@UQ_BINDIR@|/usr/bin|' "$top/systemd/ublk-qcow2@.service.in" >"$data/ublk-qcow2@.service"
qemu-img create -q -f qcow2 "$data/unit.qcow2" 64M
printf 'IMAGE=/data/unit.qcow2\nOPTIONS=-n 7 -q 2\n' >"$data/unit.conf"
truncate -s 128M "$data/raw.img"
# an L2 entry pointing at an unaligned offset: reading that cluster is an error
qemu-img create -q -f qcow2 "$data/corrupt.qcow2" 64M
qemu-io -f qcow2 -c "write -P 0x42 0 64k" "$data/corrupt.qcow2" >/dev/null
python3 - "$data/corrupt.qcow2" <<'PY'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(40)
    l1 = struct.unpack(">Q", f.read(8))[0]
    f.seek(l1)
    l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    f.seek(l2)
    f.write(struct.pack(">Q", (1 << 63) | 0x12345))
PY
# an L2 entry pointing at the L1 table: a write there is refused (overlap check)
qemu-img create -q -f qcow2 "$data/overlap.qcow2" 64M
qemu-io -f qcow2 -c "write -P 0x42 0 128k" "$data/overlap.qcow2" >/dev/null
overlap_l1=$(python3 - "$data/overlap.qcow2" <<'PY'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(40)
    l1 = struct.unpack(">Q", f.read(8))[0]
    f.seek(l1)
    l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    f.seek(l2)
    f.write(struct.pack(">Q", (1 << 63) | l1))
    f.seek(l1)
    print(f.read(512).hex())
PY
)
# an image naming a backing file, for add --no-backing
qemu-img create -q -f qcow2 "$data/nbbase.qcow2" 64M
qemu-img create -q -f qcow2 -b nbbase.qcow2 -F qcow2 "$data/nb.qcow2"
# zero copy (zcq): data, zero, compressed, unallocated clusters over a
# shorter backing file (96M of 128M), partial clusters too
qemu-img create -q -f qcow2 "$data/zcqbase.qcow2" 96M
qemu-io -f qcow2 -c "write -P 0xb1 0 96M" "$data/zcqbase.qcow2" >/dev/null
truncate -s 128M "$work/zcq.raw"
qemu-io -f raw -c "write -P 0xc1 32M 16M" -c "write -P 0xc2 100M 3M" "$work/zcq.raw" >/dev/null
qemu-img convert -c -O qcow2 "$work/zcq.raw" "$data/zcq.qcow2"
rm -f "$work/zcq.raw"
qemu-img rebase -u -b zcqbase.qcow2 -F qcow2 "$data/zcq.qcow2"
qemu-io -f qcow2 -c "write -P 0xa1 0 16M" -c "write -z 16M 8M" -c "write -P 0xa2 60M 100k" \
	-c "write -P 0xa3 90M 12M" -c "write -z 110M 1M" "$data/zcq.qcow2" >/dev/null
qemu-img convert -O raw "$data/zcq.qcow2" "$work/zcq.raw"
md5sum <"$work/zcq.raw" | cut -d' ' -f1 >"$data/zcq-init.md5"
rm -f "$work/zcq.raw"
zcqbase_sum=$(md5sum <"$data/zcqbase.qcow2")
qemu-img create -q -f qcow2 "$data/zcqe.qcow2" 64M
# qcow2 version 99: the engine must refuse it
qemu-img create -q -f qcow2 "$data/bad.qcow2" 64M
printf '\000\000\000\143' | dd of="$data/bad.qcow2" bs=1 seek=4 conv=notrunc 2>/dev/null

set +e
"$top/kernel/vm-run.sh" ${UQ_VM_VERBOSE:+-v} --kernel "$k" --timeout "${UQ_VM_TIMEOUT:-1500}" --bin "$bin" \
	--data "$data" -- "$here/guest.sh" "$@"
rc=$?
set -e
case $rc in
124) echo "FAIL: the $k VM timed out (a hung device?)"; exit 1 ;;
125) echo "FAIL: the $k VM failed (see the console above)"; exit 1 ;;
esac

fails=0
failed=
fail() { echo "FAIL $*"; fails=$((fails + 1)); failed+="FAIL $*"$'\n'; }
[ -s "$data/results" ] || fail "no results from the guest (script exit $rc)"
cat "$data/results" 2>/dev/null || true
if grep -q '^FAIL' "$data/results" 2>/dev/null; then
	fails=$((fails + 1))
	failed+=$(grep '^FAIL' "$data/results")$'\n'
fi

# Host checks: images the guest wrote must be clean; kill -9 may leak clusters.
check() { # IMAGE ALLOWED_EXIT...
	local img=$1 out e
	shift
	[ -f "$data/$img" ] || return 0
	set +e
	out=$(qemu-img check "$data/$img" 2>&1)
	e=$?
	set -e
	for ok in "$@"; do
		[ "$e" = "$ok" ] && { echo "PASS host: qemu-img check $img (exit $e)"; return; }
	done
	fail "host: qemu-img check $img exit $e"
	echo "$out" | tail -n 20
}
check ext4.qcow2 0
check xfs.qcow2 0
check fio.qcow2 0
check cow.qcow2 0
check gdcow.qcow2 0
check extl2.qcow2 0
if [ "$(md5sum <"$data/luks.qcow2")" != "$luks_sum" ]; then
	set +e
	out=$(qemu-img check --object secret,id=sec0,data=uq-secret --image-opts \
		"driver=qcow2,file.filename=$data/luks.qcow2,encrypt.key-secret=sec0" 2>&1)
	e=$?
	set -e
	[ "$e" = 0 ] && echo "PASS host: qemu-img check luks.qcow2 (with the secret)" ||
		{ fail "host: qemu-img check luks.qcow2 exit $e"; echo "$out" | tail -n 5; }
fi
if [ -f "$data/luks-ov.qcow2" ]; then
	# Each layer its own secret: qemu-img needs a json: chain for that.
	set +e
	out=$(qemu-img check --object secret,id=a,data=uq-secret --object secret,id=b,data=uq-secret2 \
		"json:{\"driver\":\"qcow2\",\"encrypt\":{\"key-secret\":\"b\"},
		\"file\":{\"driver\":\"file\",\"filename\":\"$data/luks-ov.qcow2\"},
		\"backing\":{\"driver\":\"qcow2\",\"encrypt\":{\"key-secret\":\"a\"},
		\"file\":{\"driver\":\"file\",\"filename\":\"$data/luks.qcow2\"}}}" 2>&1)
	e=$?
	set -e
	[ "$e" = 0 ] && echo "PASS host: qemu-img check luks-ov.qcow2 (two secrets)" ||
		{ fail "host: qemu-img check luks-ov.qcow2 exit $e"; echo "$out" | tail -n 5; }
fi
check cowfs.qcow2 0
check del.qcow2 0
check kill.qcow2 0 3
check recover.qcow2 0 3
check discard.qcow2 0
check term.qcow2 0
# same_as_guest IMAGE: what the guest read from the device (IMAGE's .md5)
# is what qemu-img reads from the image
same_as_guest() {
	local sum=$data/${1%.qcow2}.md5
	[ -s "$sum" ] || return 0
	qemu-img convert -O raw "$data/$1" "$work/same.raw"
	if [ "$(md5sum <"$work/same.raw" | cut -d' ' -f1)" = "$(cat "$sum")" ]; then
		echo "PASS host: $1 reads as the guest saw it (qemu-img convert)"
	else
		fail "host: $1 differs from what the guest read"
	fi
	rm -f "$work/same.raw"
}
same_as_guest fio.qcow2
same_as_guest recover.qcow2
same_as_guest cow.qcow2
same_as_guest gdcow.qcow2
check zcq.qcow2 0
same_as_guest zcq.qcow2
check zcqe.qcow2 0
same_as_guest zcqe.qcow2
[ "$(md5sum <"$data/zcqbase.qcow2")" = "$zcqbase_sum" ] &&
	echo "PASS host: zcq's base is unchanged" || fail "host: zcq's base was modified"
[ "$(md5sum <"$data/cowbase.qcow2")" = "$cowbase_sum" ] &&
	echo "PASS host: the overlay's base is unchanged" || fail "host: the overlay's base was modified"
if grep -q '^PASS discard' "$data/results" 2>/dev/null; then
	out=$(qemu-io -f qcow2 -c "read -P 0 0 1M" -c "read -P 0xab 1M 1M" \
		-c "read -P 0 2M 1M" -c "read -P 0xab 3M 1M" "$data/discard.qcow2" 2>&1) || true
	if echo "$out" | grep -qi 'fail\|error'; then
		fail "host: discard.qcow2 reads back wrong"
		echo "$out"
	else
		echo "PASS host: discard.qcow2 reads zeros where discarded and zeroed"
	fi
	# blkdiscard -z asks for zeroes without unmapping (REQ_NOUNMAP): the
	# clusters stay allocated, marked zero; the discarded ones are gone.
	if qemu-img map --output=json "$data/discard.qcow2" | python3 -c 'import json, sys
m = json.load(sys.stdin)
def at(o): return next(e for e in m if e["start"] <= o < e["start"] + e["length"])
z, d = at(2 << 20), at(0)
sys.exit(not (z["zero"] and "offset" in z and z["start"] + z["length"] >= 3 << 20
              and "offset" not in d))'; then
		echo "PASS host: discard.qcow2 keeps the zeroed clusters allocated, not the discarded ones"
	else
		fail "host: discard.qcow2: zeroed clusters not kept or discarded ones kept"
		qemu-img map --output=json "$data/discard.qcow2" | head -n 8
	fi
fi
if grep -q '^PASS overlap' "$data/results" 2>/dev/null; then
	now_l1=$(python3 -c 'import struct, sys
f = open(sys.argv[1], "rb"); f.seek(40); f.seek(struct.unpack(">Q", f.read(8))[0])
print(f.read(512).hex())' "$data/overlap.qcow2")
	if [ "$now_l1" != "$overlap_l1" ]; then
		fail "host: overlap.qcow2: the L1 table changed"
	elif qemu-img info --output=json "$data/overlap.qcow2" | grep -q '"corrupt": true'; then
		echo "PASS host: overlap.qcow2 marked corrupt, its L1 table intact"
	else
		fail "host: overlap.qcow2 is not marked corrupt"
	fi
fi
[ "$(md5sum <"$data/snap.qcow2")" = "$snap_sum" ] &&
	echo "PASS host: snapshot image unchanged" || fail "host: snapshot image was modified"
[ "$(md5sum <"$data/ro.qcow2")" = "$ro_sum" ] &&
	echo "PASS host: read-only image unchanged" || fail "host: read-only image was modified"

check gpt.qcow2 0
check unit.qcow2 0
if grep -q '^PASS unit' "$data/results" 2>/dev/null; then
	out=$(qemu-io -r -f qcow2 -c "read -P 0x55 1M 4M" -c "read -P 0 0 1M" "$data/unit.qcow2" 2>&1) || true
	if echo "$out" | grep -qi 'fail\|error'; then
		fail "host: unit.qcow2 lacks what the unit's device wrote"
		echo "$out"
	else
		echo "PASS host: unit.qcow2 holds what the unit's device wrote before SIGTERM"
	fi
fi
# The GPT image inspected on the host: the table and a file of partition 1.
if grep -q '^PASS gpt: partition 1 reads back' "$data/results" 2>/dev/null; then
	qemu-img convert -O raw "$data/gpt.qcow2" "$work/gpt.raw"
	table=$(sfdisk -d "$work/gpt.raw" 2>&1 || true)
	start=$(echo "$table" | sed -n 's/^.*gpt.raw1 : start= *\([0-9]*\), size= *\([0-9]*\).*/\1/p')
	size=$(echo "$table" | sed -n 's/^.*gpt.raw1 : start= *\([0-9]*\), size= *\([0-9]*\).*/\2/p')
	if echo "$table" | grep -q '^label: gpt' && [ "$(echo "$table" | grep -c 'gpt.raw[0-9] :')" = 2 ] &&
		[ -n "$start" ] && [ "$size" = 49152 ]; then
		dd if="$work/gpt.raw" of="$work/gpt1.img" bs=512 skip="$start" count="$size" 2>/dev/null
		got=$(debugfs -R "cat /hello.txt" "$work/gpt1.img" 2>/dev/null)
		[ "$got" = "partition 1" ] &&
			echo "PASS host: gpt.qcow2 holds a GPT with 2 partitions; p1's hello.txt: $got" ||
			fail "host: gpt.qcow2 partition 1: hello.txt reads '$got'"
	else
		fail "host: gpt.qcow2 has no 2-partition GPT (24 MiB first): $table"
	fi
	rm -f "$work/gpt.raw" "$work/gpt1.img"
fi

[ "$rc" = 0 ] || [ "$fails" -gt 0 ] || fail "guest script exit $rc"
if [ "$fails" -gt 0 ]; then
	# Repeated last: CI logs keep only the tail of a long console.
	printf 'e2e %s: FAILED\n%s' "$k" "$failed"
	exit 1
fi
echo "e2e $k: passed"
