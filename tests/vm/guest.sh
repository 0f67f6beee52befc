# SPDX-License-Identifier: MIT
# The guest half of tests/vm/e2e.sh, run by kernel/vm-run.sh in the test VM
# (busybox sh, as root, in /data). Each scenario serves an image made on the
# host and records one line per check in /data/results ("PASS name" or
# "FAIL name: why"); the host checks the images afterwards.
#
#   guest.sh [SCENARIO...]     ext4 xfs fio cow getdata snap overlay extl2 luks ro discard raw null bad corrupt
#                              overlap term del kill recover gpt unit zc zcq tmpfs enospc probe
#                              (default: all)

B=ublk-qcow2
R=/data/results
FIO_MB=${UQ_FIO_MB:-64}
: >"$R"

pass() { echo "PASS $*" | tee -a "$R"; }
fail() { echo "FAIL $*" | tee -a "$R"; }
say() { echo "== $*"; }

# add ARGS...: serve an image; sets DEV and ID. Nonzero if add failed.
add() {
	DEV=$("$B" add "$@") || return 1
	ID=${DEV#/dev/ublkb}
	i=0
	while [ ! -b "$DEV" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
	[ -b "$DEV" ]
}

# gone NAME: the device node and the kernel's device must both be gone.
gone() {
	i=0
	while [ -e "$DEV" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
	if [ -e "$DEV" ]; then fail "$1: $DEV still exists after del"; return 1; fi
	if "$B" list -n "$ID" >/dev/null 2>&1; then fail "$1: ublk device $ID still listed"; return 1; fi
	return 0
}

# writes_done DEV: how many writes DEV has completed.
writes_done() {
	set -- $(cat "/sys/block/${1#/dev/}/stat" 2>/dev/null)
	echo "${5:-0}"
}

# wait_writes DEV SECS [COUNT]: until DEV has completed more than COUNT
# (default 0) writes, so a kill lands while fio writes however fast the
# device is; 1 if that did not happen in SECS.
wait_writes() {
	i=0
	while [ $i -lt $(($2 * 10)) ]; do
		[ "$(writes_done "$1")" -gt "${3:-0}" ] && return 0
		sleep 0.1
		i=$((i + 1))
	done
	return 1
}

# wait_exit PID SECS NAME: wait for a process (child or not) without hanging.
wait_exit() {
	i=0
	while [ $i -lt $(($2 * 10)) ]; do
		case $(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$1/status" 2>/dev/null) in
		'' | Z) wait "$1" 2>/dev/null; return 0 ;;
		esac
		sleep 0.1
		i=$((i + 1))
	done
	fail "$3: process $1 hung ($(sed -n 's/^State:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null))"
	cat "/proc/$1/stack" 2>/dev/null
	return 1
}

# fio_verify TAG JOB LOG FIO-OPTIONS...: fio writes $DEV with verify=crc32c
# (direct, libaio; the options say the rest); one PASS line for TAG, or a
# FAIL and the tail of LOG.
fio_verify() {
	tag=$1 job=$2 log=$3
	shift 3
	fio --name="$job" --filename="$DEV" --direct=1 --ioengine=libaio "$@" \
		--verify=crc32c --verify_fatal=1 >"$log" 2>&1
	rc=$?
	grep -E 'IOPS|err' "$log"
	if [ $rc = 0 ]; then
		pass "$tag: $(echo "$*" | sed -n 's/.*--rw=\([a-z]*\).*/\1/p') with verify=crc32c"
	else
		fail "$tag: fio exit $rc"; tail -n 30 "$log"
	fi
}

# kill_under_fio TAG JOB SIZE: fio randwrite with verify=crc32c of SIZE on
# $DEV in the background (FIO its pid, /data/JOB.fio its log, /data/JOB.rc
# its exit status), and kill -9 of the daemon $pid once the device has
# completed writes, so the kill lands while fio writes however fast the
# device is. Nonzero if the daemon hung.
kill_under_fio() {
	rm -f "/data/$2.rc"
	(fio --name="$2" --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=16 \
		--rw=randwrite --bsrange=4k-64k --size="$3" --verify=crc32c --do_verify=1 \
		--verify_fatal=1 >"/data/$2.fio" 2>&1
	 echo $? >"/data/$2.rc") &
	FIO=$!
	wait_writes "$DEV" 60 || fail "$1: no write reached the device"
	[ -e "/data/$2.rc" ] && fail "$1: fio ended before the kill (raise --size)"
	kill -9 "$pid"
	wait_exit "$pid" 30 "$1: daemon"
}

# fio_bg_result TAG JOB: wait for kill_under_fio's fio; PASS when it exited
# 0 with no error, after every block it wrote, before and after the kill,
# was verified.
fio_bg_result() {
	wait_exit "$FIO" 600 "$1: fio" || return 1
	rc=$(cat "/data/$2.rc" 2>/dev/null)
	grep -E 'IOPS|err|verify' "/data/$2.fio"
	if [ "$rc" = 0 ] && grep -q 'err= 0' "/data/$2.fio"; then
		pass "$1: fio randwrite + verify=crc32c passed across kill -9 and recover"
	else
		fail "$1: fio exit ${rc:-none}"; tail -n 30 "/data/$2.fio"
	fi
}

# write_refused NAME WHAT DD-OPTIONS...: a direct write of zeros to $DEV
# (WHAT, for the messages) must fail, and must not hang.
write_refused() {
	name=$1 what=$2
	shift 2
	timeout 60 dd if=/dev/zero of="$DEV" oflag=direct "$@" 2>/dev/null
	case $? in
	0) fail "$name: $what succeeded" ;;
	124) fail "$name: $what hung" ;;
	esac
}

# ro_md5 NAME IMAGE: del the device, serve IMAGE read-only and write its
# checksum to /data/NAME.md5 (the host compares it with qemu-img's), del
# again. Nonzero when something failed.
ro_md5() {
	"$B" del -n "$ID" || fail "$1: del"
	gone "$1" || return 1
	add --read-only "$2" || { fail "$1: read-only add"; return 1; }
	md5sum <"$DEV" | cut -d' ' -f1 >"/data/$1.md5"
	"$B" del -n "$ID" || fail "$1: read-only del"
	gone "$1"
}

# A file system on a qcow2 image: files written, read back from a second add.
fs_test() { # NAME FSTYPE IMAGE
	name=$1 fs=$2 img=$3 mnt=/mnt/$1
	say "$name: mkfs.$fs on $img"
	mkdir -p "$mnt"
	add "$img" || { fail "$name: add $img"; return; }
	case $fs in
	ext4) mkfs.ext4 -q -F "$DEV" ;;
	xfs) mkfs.xfs -q -f "$DEV" ;;
	esac || { fail "$name: mkfs.$fs"; "$B" del -n "$ID"; return; }
	mount -t "$fs" "$DEV" "$mnt" || { fail "$name: mount"; "$B" del -n "$ID"; return; }
	mkdir -p "$mnt/dir"
	dd if=/dev/urandom of="$mnt/big" bs=1M count=8 2>/dev/null
	dd if=/dev/urandom of="$mnt/odd" bs=4097 count=77 2>/dev/null
	for i in $(seq 1 40); do echo "file $i of $name" >"$mnt/dir/f$i"; done
	(cd "$mnt" && md5sum big odd dir/*) >"/data/$name.md5"
	umount "$mnt" || fail "$name: umount"
	"$B" del -n "$ID" || fail "$name: del"
	gone "$name" || return
	qemu-img check -q "$img" || fail "$name: qemu-img check after del"
	add "$img" || { fail "$name: second add"; return; }
	mount -t "$fs" -o ro "$DEV" "$mnt" || { fail "$name: second mount"; "$B" del -n "$ID"; return; }
	if (cd "$mnt" && md5sum -c "/data/$name.md5" >/dev/null); then
		pass "$name: files read back from a second add"
	else
		fail "$name: files differ after a second add"
	fi
	umount "$mnt"
	"$B" del -n "$ID" || fail "$name: second del"
	gone "$name" && pass "$name: del"
}

# fio random writes with crc32c verification: two jobs on two queues, then
# the whole device's checksum (from a fresh read-only add) for the host to
# compare with qemu-img convert's.
fio_test() {
	say "fio: randwrite 4k-128k, verify, 2 queues, 2 x ${FIO_MB} MiB"
	add -q 2 /data/fio.qcow2 || { fail "fio: add"; return; }
	"$B" list -n "$ID"
	"$B" list -n "$ID" --output=json | grep -q '"queues": 2' || fail "fio: list shows no 2 queues"
	fio_verify fio verify /data/fio.log --iodepth=16 --rw=randwrite --bsrange=4k-128k \
		--numjobs=2 --size=512m --offset_increment=512m --io_size="${FIO_MB}m" --group_reporting
	ro_md5 fio /data/fio.qcow2
}

# Writes through an overlay over a zstd-compressed base: unaligned writes
# copy on write, with NEED_GET_DATA landing the data in the COW buffer.
# fio verifies; the host compares the device's checksum with qemu-img's
# conversion and checks that the base is untouched. Then a file system.
cow_test() {
	say "cow: fio verify on an overlay over a zstd-compressed base, then ext4"
	add /data/cow.qcow2 || { fail "cow: add"; return; }
	copy_mode cow USER_COPY
	fio_verify cow cow /data/cow.log --iodepth=16 --rw=randwrite --bsrange=512-64k --size=120m \
		--io_size="${FIO_MB}m"
	ro_md5 cow /data/cow.qcow2 || return
	cp /data/cow.qcow2 /data/cowfs.qcow2
	fs_test cowfs ext4 /data/cowfs.qcow2
}

# copy_mode NAME FEATURE: the device uses USER_COPY where the kernel has it
# (6.4+; our 6.1 has not), else NEED_GET_DATA; FEATURE is the one expected
# on kernels with USER_COPY.
copy_mode() {
	want=$2
	[ "$UQ_KERNEL" = 6.1 ] && want=NEED_GET_DATA
	if "$B" list -n "$ID" | grep features | grep -qw "$want"; then
		pass "$1: the device uses $want"
	else
		fail "$1: the device does not use $want: $("$B" list -n "$ID" | grep features)"
	fi
}

# The same copy-on-write writes with --no-user-copy: NEED_GET_DATA even on
# kernels that offer USER_COPY (both paths are tested on 6.12 and sid).
getdata_test() {
	say "getdata: fio verify on an overlay, add --no-user-copy"
	add --no-user-copy -q 2 /data/gdcow.qcow2 || { fail "getdata: add"; return; }
	copy_mode getdata NEED_GET_DATA
	fio_verify getdata gd /data/gd.log --iodepth=16 --rw=randwrite --bsrange=512-64k \
		--size=120m --numjobs=2 --group_reporting --io_size="${FIO_MB}m"
	md5sum <"$DEV" | cut -d' ' -f1 >/data/gdcow.md5
	"$B" del -n "$ID" || fail "getdata: del"
	gone getdata
}

# fio verify, then ext4 files read back from a second add, on an image of a
# given kind (extended L2 over a backing file, LUKS); ADD OPTIONS go to add.
# A LUKS overlay with its own passphrase over luks.qcow2: add takes both keys.
luks_chain_test() {
	say "luks: an encrypted overlay with another key over /data/luks.qcow2"
	base=/data/luks.qcow2 ov=/data/luks-ov.qcow2
	rm -f "$ov"
	add --read-only --key-secret uq-secret "$base" || { fail "luks chain: add the base"; return; }
	want=$(md5sum <"$DEV")
	"$B" del -n "$ID" || fail "luks chain: del the base"
	# The new image takes the first key; the base opens with the second.
	"$B" create -q -o encrypt.format=luks,encrypt.iter-time=10 --key-secret uq-secret2 \
		--key-secret uq-secret -b luks.qcow2 -F qcow2 "$ov" ||
		{ fail "luks chain: create the overlay"; return; }
	sum=$(md5sum <"$base")
	if add --key-secret uq-secret2 "$ov" 2>/data/luks-ov.err; then
		fail "luks chain: add without the base's key succeeded"
		"$B" del -n "$ID"
	else
		grep -q "luks.qcow2.*invalid password" /data/luks-ov.err &&
			pass "luks chain: the base's key missing is refused ($(head -n1 /data/luks-ov.err))" ||
			fail "luks chain: error without the base's key: $(cat /data/luks-ov.err)"
	fi
	add --key-secret uq-secret2 --key-secret uq-secret "$ov" ||
		{ fail "luks chain: add with both keys"; return; }
	[ "$(md5sum <"$DEV")" = "$want" ] && pass "luks chain: the overlay reads as its base" ||
		fail "luks chain: the overlay reads differently from its base"
	dd if=/dev/urandom of=/data/luks-ov.data bs=64k count=16 status=none
	dd if=/data/luks-ov.data of="$DEV" bs=64k seek=17 oflag=direct status=none ||
		fail "luks chain: write"
	"$B" del -n "$ID" || fail "luks chain: del"
	add --read-only --key-secret uq-secret2 --key-secret uq-secret "$ov" ||
		{ fail "luks chain: second add"; return; }
	got=$(dd if="$DEV" bs=64k skip=17 count=16 status=none | md5sum)
	[ "$got" = "$(md5sum </data/luks-ov.data)" ] &&
		pass "luks chain: what was written reads back" ||
		fail "luks chain: what was written does not read back ($got, $(ls -l /data/luks-ov.data))"
	"$B" del -n "$ID" || fail "luks chain: second del"
	[ "$(md5sum <"$base")" = "$sum" ] && pass "luks chain: the base is unchanged" ||
		fail "luks chain: writes to the overlay changed the base"
}

img_test() { # NAME IMAGE [ADD OPTIONS...]
	name=$1 img=$2 mnt=/mnt/$1
	shift 2
	say "$name: fio verify, then ext4, on $img"
	add "$@" "$img" || { fail "$name: add"; return; }
	fio_verify "$name" "$name" "/data/$name.log" --iodepth=16 --rw=randwrite \
		--bsrange=512-64k --size=96m --io_size="${FIO_MB}m"
	mkdir -p "$mnt"
	if ! mkfs.ext4 -q -F "$DEV" || ! mount -t ext4 "$DEV" "$mnt"; then
		fail "$name: mkfs.ext4 or mount"
		"$B" del -n "$ID"
		return
	fi
	dd if=/dev/urandom of="$mnt/big" bs=1M count=8 2>/dev/null
	dd if=/dev/urandom of="$mnt/odd" bs=4097 count=77 2>/dev/null
	(cd "$mnt" && md5sum big odd) >"/data/$name.md5"
	umount "$mnt" || fail "$name: umount"
	"$B" del -n "$ID" || fail "$name: del"
	gone "$name" || return
	add "$@" "$img" || { fail "$name: second add"; return; }
	if mount -t ext4 -o ro "$DEV" "$mnt" && (cd "$mnt" && md5sum -c "/data/$name.md5" >/dev/null); then
		pass "$name: files read back from a second add"
	else
		fail "$name: files differ after a second add"
	fi
	umount "$mnt"
	"$B" del -n "$ID" || fail "$name: second del"
	gone "$name"
}

# --read-only: the device reads as the image's raw conversion; writes fail.
ro_test() {
	say "ro: --read-only of an image filled by qemu-io"
	add --read-only /data/ro.qcow2 || { fail "ro: add"; return; }
	if cmp "$DEV" /data/ro.raw; then pass "ro: content equals qemu-img convert -O raw"
	else fail "ro: content differs from qemu-img convert -O raw"; fi
	if dd if=/dev/zero of="$DEV" bs=4096 count=1 oflag=direct 2>/data/ro.err; then
		fail "ro: a write succeeded"
	else
		pass "ro: writes fail ($(grep -m1 -i err /data/ro.err))"
	fi
	[ "$(blockdev --getro "$DEV")" = 1 ] || fail "ro: blockdev --getro is not 1"
	"$B" del -n "$ID" || fail "ro: del"
	gone ro
}

# add --snapshot: an internal snapshot served read-only, as qemu-img reads it.
snap_test() {
	say "snap: add --snapshot of an image with two snapshots"
	for s in s1 s2; do
		add --snapshot "$s" /data/snap.qcow2 || { fail "snap: add --snapshot $s"; continue; }
		if cmp "$DEV" "/data/snap-$s.raw"; then pass "snap: $s reads as qemu-img convert -l shows it"
		else fail "snap: $s differs from qemu-img's conversion"; fi
		dd if=/dev/zero of="$DEV" bs=4096 count=1 oflag=direct 2>/dev/null &&
			fail "snap: a write to snapshot $s succeeded"
		"$B" del -n "$ID" || fail "snap: del"
		gone snap
	done
	add --snapshot nosuch /data/snap.qcow2 2>/data/snap.err &&
		{ fail "snap: add of a missing snapshot succeeded"; "$B" del -n "$ID"; }
	grep -q . /data/snap.err && pass "snap: a missing snapshot is refused ($(head -n1 /data/snap.err))"
}

# add --overlay: writes go to an unlinked overlay in $TMPDIR; the image (the
# read-only test's, whose checksum the host compares) is never written.
overlay_test() {
	say "overlay: add --overlay, fio verify, nothing left behind"
	rm -rf /tmp/ovl
	mkdir -p /tmp/ovl
	DEV=$(TMPDIR=/tmp/ovl "$B" add --overlay /data/ro.qcow2) || { fail "overlay: add"; return; }
	ID=${DEV#/dev/ublkb}
	i=0
	while [ ! -b "$DEV" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
	cmp "$DEV" /data/ro.raw && pass "overlay: reads as the image" ||
		fail "overlay: content differs from the image"
	fio_verify overlay ovl /data/ovl.log --iodepth=16 --rw=randwrite --bsrange=512-64k \
		--size=64m --io_size=16m
	[ -z "$(ls -A /tmp/ovl)" ] && pass "overlay: no file in TMPDIR" || fail "overlay: files in TMPDIR"
	"$B" del -n "$ID" || fail "overlay: del"
	gone overlay
}

# Discard and write-zeroes on qcow2: the host checks what reads back.
discard_test() {
	say "discard: blkdiscard and blkdiscard -z on a filled image"
	add /data/discard.qcow2 || { fail "discard: add"; return; }
	blkdiscard -o 0 -l 1M "$DEV" || fail "discard: blkdiscard"
	blkdiscard -z -o 2M -l 1M "$DEV" || fail "discard: blkdiscard -z"
	if cmp -n 1048576 "$DEV" /dev/zero && dd if="$DEV" bs=1M skip=2 count=1 2>/dev/null |
		cmp - /dev/zero -n 1048576; then
		pass "discard: discarded and zeroed ranges read as zeros"
	else
		fail "discard: discarded or zeroed range does not read as zeros"
	fi
	"$B" del -n "$ID" || fail "discard: del"
	gone discard
}

# The raw (loop-like) target: 2 queues of depth 1024, fio verify, discard.
raw_test() {
	say "raw: -f raw -q 2 -d 1024"
	add -f raw -q 2 -d 1024 /data/raw.img || { fail "raw: add"; return; }
	fio_verify raw raw /data/raw.log --iodepth=64 --rw=randwrite --bsrange=4k-64k --size=128m \
		--io_size=16m
	blkdiscard -z -o 1M -l 1M "$DEV" || fail "raw: blkdiscard -z"
	dd if="$DEV" bs=1M skip=1 count=1 2>/dev/null | cmp - /dev/zero -n 1048576 ||
		fail "raw: zeroed range does not read as zeros"
	"$B" del -n "$ID" || fail "raw: del"
	gone raw
}

# A raw image served without -f: its format was guessed, so (as QEMU's raw
# driver) writes that would make its first sector a qcow2 header are
# refused; the next add would otherwise serve a qcow2 image the guest made,
# with a backing file of its choice. With -f raw they are the guest's to make.
probe_test() {
	say "probe: a raw image served without -f"
	img=/data/probe.img
	dd if=/dev/zero bs=1M count=8 2>/dev/null | tr '\0' '\132' >"$img"
	qemu-img create -q -f qcow2 /tmp/probe.qcow2 1M
	dd if=/tmp/probe.qcow2 of=/tmp/probe.hdr bs=512 count=1 2>/dev/null
	add "$img" 2>/data/probe.err || { fail "probe: add"; return; }
	grep -q "warning: .*probe.img.*raw" /data/probe.err &&
		pass "probe: add warns ($(cat /data/probe.err))" || fail "probe: no warning: $(cat /data/probe.err)"
	dd if=/tmp/probe.hdr of="$DEV" bs=512 count=1 oflag=direct conv=notrunc,fsync 2>/dev/null &&
		fail "probe: a qcow2 header written to sector 0"
	{ cat /tmp/probe.hdr; dd if=/dev/zero bs=512 count=127 2>/dev/null; } |
		dd of="$DEV" bs=64k count=1 oflag=direct conv=notrunc,fsync 2>/dev/null &&
		fail "probe: a 64k write starting with a qcow2 header"
	dd if=/tmp/probe.hdr of="$DEV" bs=512 seek=8 count=1 oflag=direct conv=notrunc,fsync 2>/dev/null ||
		fail "probe: a qcow2 header at 4k refused"
	dd if=/dev/zero bs=512 count=1 2>/dev/null | tr '\0' '\141' |
		dd of="$DEV" bs=512 count=1 oflag=direct conv=notrunc,fsync 2>/dev/null ||
		fail "probe: other data in sector 0 refused"
	"$B" del -n "$ID" || fail "probe: del"
	[ "$(dd if="$img" bs=512 count=1 2>/dev/null | tr -d a | wc -c)" = 0 ] &&
		dd if="$img" bs=512 skip=8 count=1 2>/dev/null | cmp -s - /tmp/probe.hdr &&
		pass "probe: sector 0 kept from the header, other writes landed" ||
		fail "probe: the file is not as written"
	add -f raw "$img" 2>/data/probe.err || { fail "probe: add -f raw"; return; }
	grep -q warning /data/probe.err && fail "probe: -f raw warns: $(cat /data/probe.err)"
	dd if=/tmp/probe.hdr of="$DEV" bs=512 count=1 oflag=direct conv=notrunc,fsync 2>/dev/null ||
		fail "probe: -f raw refused a qcow2 header in sector 0"
	"$B" del -n "$ID" || fail "probe: del -f raw"
	dd if="$img" bs=512 count=1 2>/dev/null | cmp -s - /tmp/probe.hdr &&
		pass "probe: with -f raw the header lands" || fail "probe: -f raw header missing"
	rm -f "$img" /tmp/probe.qcow2 /tmp/probe.hdr
}

# Images on tmpfs: their files are opened O_NONBLOCK (tmpfs lacks
# FMODE_NOWAIT; io_uring then tries their I/O inline instead of punting it
# to a worker). A qcow2 overlay over a base, both on tmpfs, and a raw file:
# fio verify, then the device reads as qemu-img reads the image.
tmpfs_test() {
	say "tmpfs: qcow2 overlay and raw on tmpfs"
	t=/tmp/uq-tmpfs
	mkdir -p "$t"
	mount -t tmpfs -o size=400m tmpfs "$t" || { fail "tmpfs: mount"; return; }
	qemu-img create -q -f qcow2 "$t/base.qcow2" 128M &&
		qemu-io -f qcow2 -c "write -P 0x5a 0 32M" "$t/base.qcow2" >/dev/null &&
		qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$t/ov.qcow2" &&
		truncate -s 128M "$t/raw.img" || { fail "tmpfs: images"; umount "$t"; return; }
	add -q 2 "$t/ov.qcow2" || { fail "tmpfs: add"; umount "$t"; return; }
	fio_verify "tmpfs qcow2" tmpfs /data/tmpfs.log --iodepth=32 --rw=randrw --bsrange=4k-64k \
		--size=48m --io_size=24m --numjobs=2 --offset_increment=48m --group_reporting
	dev_sum=$(md5sum <"$DEV" | cut -d' ' -f1)
	"$B" del -n "$ID" || fail "tmpfs: del"
	qemu-img check -q "$t/ov.qcow2" || fail "tmpfs: qemu-img check"
	qemu-img convert -O raw "$t/ov.qcow2" "$t/ov.raw" || fail "tmpfs: qemu-img convert"
	[ "$(md5sum <"$t/ov.raw" | cut -d' ' -f1)" = "$dev_sum" ] &&
		pass "tmpfs qcow2: the image reads as the device did" ||
		fail "tmpfs qcow2: the image differs from what the device read"
	add -f raw "$t/raw.img" || { fail "tmpfs: raw add"; umount "$t"; return; }
	fio_verify "tmpfs raw" tmpfsraw /data/tmpfs.log --iodepth=32 --rw=randwrite --bsrange=4k-64k \
		--size=128m --io_size=32m
	dev_sum=$(md5sum <"$DEV" | cut -d' ' -f1)
	"$B" del -n "$ID" || fail "tmpfs: raw del"
	[ "$(md5sum <"$t/raw.img" | cut -d' ' -f1)" = "$dev_sum" ] &&
		pass "tmpfs raw: the file reads as the device did" ||
		fail "tmpfs raw: the file differs from what the device read"
	umount "$t"
}

# tmo NAME WHAT SECS CMD...: run CMD with a time limit; its exit status in
# RC, or RC=hung and a FAIL when the limit stopped it.
tmo() {
	name=$1 what=$2 secs=$3
	shift 3
	t0=$(date +%s)
	timeout "$secs" "$@"
	RC=$?
	if [ $(($(date +%s) - t0)) -ge "$secs" ] || [ $RC = 124 ] || [ $RC = 137 ] || [ $RC = 143 ]; then
		fail "$name: $what hung (stopped after $secs s)"
		RC=hung
	fi
}

# A file system that fills up under the image (a 64 MiB qcow2 on a tmpfs of
# 16 MiB, or on ext4 over a RAM disk with all but 16 MiB taken by a filler
# file): fio randwrite (many allocations in flight on both queues) and dd
# past what fits fail with an I/O error and do not hang, the daemon lives
# on, what was written before reads back; with space freed (tmpfs remounted
# larger, the filler removed) the same device takes the writes again; after
# del the image is clean and reads, in qemu-img, as the device read.
enospc_test() { # tmpfs | ext4
	fs=$1 n="enospc $1" t=/tmp/uq-enospc-$1
	say "$n: a full file system under the image"
	t1=$(date +%s)
	mkdir -p "$t"
	case $fs in
	tmpfs) mount -t tmpfs -o size=16m tmpfs "$t" || { fail "$n: mount"; return; } ;;
	ext4)
		[ -b /dev/ram0 ] || insmod "/lib/modules/$(uname -r)/brd.ko" rd_nr=1 rd_size=$((96 * 1024)) ||
			{ fail "$n: insmod brd"; return; }
		mkfs.ext4 -q -F /dev/ram0 && mount -t ext4 /dev/ram0 "$t" || { fail "$n: mkfs/mount"; return; }
		avail=$(df -k "$t" | awk 'NR == 2 { print int($4 / 1024) }')
		dd if=/dev/zero of="$t/filler" bs=1M count=$((avail - 16)) 2>/dev/null && sync ||
			{ fail "$n: filler"; umount "$t"; return; }
		;;
	esac
	qemu-img create -q -f qcow2 "$t/e.qcow2" 64M || { fail "$n: qemu-img create"; umount "$t"; return; }
	add -q 2 "$t/e.qcow2" || { fail "$n: add"; umount "$t"; return; }
	pid=$(sed -n 's/^pid=//p' "/run/ublk-qcow2/$ID.info")
	dd if=/dev/urandom of=/tmp/enospc.pat bs=1M count=4 2>/dev/null
	# 60 MiB of 0x55: tr once, on 1 MiB (a slow byte loop under TCG)
	dd if=/dev/zero bs=1M count=1 2>/dev/null | tr '\0' '\125' >/tmp/enospc.1m
	for i in $(seq 60); do cat /tmp/enospc.1m; done >/tmp/enospc.55
	dd if=/tmp/enospc.pat of="$DEV" bs=1M oflag=direct 2>/dev/null || fail "$n: the first 4 MiB"

	tmo "$n" "fio randwrite" 60 fio --name=enospc --filename="$DEV" --direct=1 --ioengine=libaio \
		--iodepth=32 --rw=randwrite --bs=64k --offset=4m --size=60m >/data/enospc.fio 2>&1
	case $RC in
	0) fail "$n: fio randwrite of 60 MiB into a 16 MiB file system succeeded" ;;
	hung) ;;
	*) pass "$n: fio randwrite failed (exit $RC): $(grep -m1 -o 'error=.*' /data/enospc.fio)" ;;
	esac
	tmo "$n" "dd" 60 dd if=/tmp/enospc.55 of="$DEV" bs=1M seek=4 oflag=direct 2>/dev/null
	case $RC in
	0) fail "$n: dd of 60 MiB into a 16 MiB file system succeeded" ;;
	hung) ;;
	*) pass "$n: dd oflag=direct failed (exit $RC)" ;;
	esac
	kill -0 "$pid" 2>/dev/null && "$B" list -n "$ID" | grep -q LIVE &&
		pass "$n: the daemon is alive and LIVE" || fail "$n: the daemon died"
	tmo "$n" "the read-back" 60 sh -c "dd if=$DEV bs=1M count=4 iflag=direct 2>/dev/null |
		cmp -s - /tmp/enospc.pat"
	[ "$RC" = 0 ] && pass "$n: the 4 MiB written before read back" ||
		fail "$n: the 4 MiB written before differ ($RC)"

	case $fs in
	tmpfs) mount -o remount,size=200m "$t" ;;
	ext4) rm -f "$t/filler" && sync ;;
	esac || fail "$n: freeing space"
	tmo "$n" "dd after freeing space" 60 dd if=/tmp/enospc.55 of="$DEV" bs=1M seek=4 oflag=direct \
		2>/dev/null
	[ "$RC" = 0 ] && pass "$n: dd of 60 MiB after freeing space" || fail "$n: dd after freeing space exit $RC"
	want=$(cat /tmp/enospc.pat /tmp/enospc.55 | md5sum | cut -d' ' -f1)
	dev_sum=$(dd if="$DEV" bs=1M iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
	[ "$dev_sum" = "$want" ] && pass "$n: the device reads back what was written before and after" ||
		fail "$n: the device reads back wrong after freeing space"
	"$B" del -n "$ID" || fail "$n: del"
	gone "$n"
	out=$(qemu-img check "$t/e.qcow2" 2>&1)
	rc=$?
	[ $rc = 0 ] && pass "$n: qemu-img check clean" || { fail "$n: qemu-img check exit $rc"; echo "$out"; }
	# to /tmp: the file system under the image need not hold a raw copy
	qemu-img convert -O raw "$t/e.qcow2" /tmp/enospc.raw || fail "$n: qemu-img convert"
	[ "$(md5sum </tmp/enospc.raw | cut -d' ' -f1)" = "$dev_sum" ] &&
		pass "$n: the image reads as the device did ($(($(date +%s) - t1)) s)" ||
		fail "$n: the image differs from what the device read"
	rm -f /tmp/enospc.pat /tmp/enospc.1m /tmp/enospc.55 /tmp/enospc.raw
	umount "$t"
}

# Zero copy (UBLK_F_AUTO_BUF_REG, 6.16+: sid): the raw target's file I/O
# reads and writes the requests' own pages; 6.12 copies with USER_COPY, 6.1
# with NEED_GET_DATA; --no-zero-copy keeps USER_COPY on sid. Each way: fio
# verify, data written through the device reads back, and a read past the
# end of a file that shrank under the device reads zeros (with zero copy, a
# write of zeros through the char device into the request's pages).
zc_test() {
	for mode in zc nozc; do
		case $UQ_KERNEL:$mode in
		6.1:*) want=NEED_GET_DATA ;;
		6.12:* | *:nozc) want=USER_COPY ;;
		*) want=AUTO_BUF_REG ;;
		esac
		opts=''
		[ $mode = nozc ] && opts=--no-zero-copy
		say "zc: -f raw $opts, expecting $want"
		rm -f /data/zc.img
		truncate -s 128M /data/zc.img
		add -f raw -q 2 $opts /data/zc.img || { fail "zc $mode: add"; continue; }
		feat=$("$B" list -n "$ID" | grep features)
		if echo "$feat" | grep -qw "$want" &&
			{ [ "$want" = AUTO_BUF_REG ] || ! echo "$feat" | grep -qw AUTO_BUF_REG; }; then
			pass "zc $mode: the device uses $want"
		else
			fail "zc $mode: expected $want: $feat"
		fi
		fio_verify "zc $mode" zc /data/zc.log --iodepth=32 --rw=randrw --bsrange=512-128k \
			--size=96m --io_size=16m
		# 512 KiB across 64M; after the file shrinks to 64M, dd's second
		# 256 KiB read lands past its end, into the buffer (the request's
		# pages) that still holds the first read's data: zeros must replace it.
		dd if=/dev/urandom of=/data/zc.pat bs=256k count=2 2>/dev/null
		dd if=/data/zc.pat of="$DEV" bs=256k seek=255 oflag=direct 2>/dev/null
		if dd if="$DEV" bs=256k skip=255 count=2 iflag=direct 2>/dev/null | cmp -s - /data/zc.pat; then
			pass "zc $mode: data written through the device reads back"
		else
			fail "zc $mode: data written at 64M - 256K reads back different"
		fi
		truncate -s 64M /data/zc.img
		{ head -c 262144 /data/zc.pat; head -c 262144 /dev/zero; } >/data/zc.want
		if dd if="$DEV" bs=256k skip=255 count=2 iflag=direct 2>/dev/null | cmp -s - /data/zc.want; then
			pass "zc $mode: past the end of a file that shrank reads zeros"
		else
			fail "zc $mode: past the end of a file that shrank does not read zeros"
		fi
		"$B" del -n "$ID" || fail "zc $mode: del"
		gone "zc $mode"
	done
	rm -f /data/zc.img /data/zc.pat /data/zc.want

	# kill -9 during fio verify and recover: the new daemon's ring gets a
	# fresh buffer table, the reissued requests their pages in it.
	say "zc: kill -9 and recover of a raw device during fio verify"
	case $UQ_KERNEL in 6.1) want=NEED_GET_DATA ;; 6.12) want=USER_COPY ;; *) want=AUTO_BUF_REG ;; esac
	truncate -s 128M /data/zc.img
	add -f raw --recovery /data/zc.img || { fail "zc recover: add"; return; }
	pid=$(sed -n 's/^pid=//p' "/run/ublk-qcow2/$ID.info")
	kill_under_fio "zc recover" zcr 96m || return
	out=$(timeout 120 "$B" recover -n "$ID" 2>&1)
	rc=$?
	[ $rc = 0 ] && [ "$out" = "$DEV" ] && pass "zc recover: recover -n $ID" ||
		fail "zc recover: recover exit $rc: $out"
	fio_bg_result "zc recover" zcr || return
	"$B" list -n "$ID" | grep features | grep -qw "$want" ||
		fail "zc recover: the recovered device does not use $want"
	"$B" del -n "$ID" || fail "zc recover: del"
	gone "zc recover"
	rm -f /data/zc.img
}

# Zero copy for qcow2 (sid): READs of plain allocated clusters go straight
# into the request's pages; holes, zeros, the backing file, compressed
# clusters and WRITEs that need other bytes in their new clusters fall back
# to a pool buffer. zcq.qcow2 (made on the host) has all of those; the
# first read must match qemu-img's view
# (zcq-init.md5). Then fio verify with zero copy, the same reads with
# --no-zero-copy and fio again, and a last zero-copy read for the host to
# compare (zcq.md5).
zcq_test() {
	case $UQ_KERNEL in 6.1) want=NEED_GET_DATA ;; 6.12) want=USER_COPY ;; *) want=AUTO_BUF_REG ;; esac
	say "zcq: qcow2 with zero copy, expecting $want"
	add -q 2 /data/zcq.qcow2 || { fail "zcq: add"; return; }
	"$B" list -n "$ID" | grep features | grep -qw "$want" && pass "zcq: the device uses $want" ||
		fail "zcq: expected $want: $("$B" list -n "$ID" | grep features)"
	sum=$(md5sum <"$DEV" | cut -d' ' -f1)
	[ "$sum" = "$(cat /data/zcq-init.md5)" ] &&
		pass "zcq: data, holes, zeros, compressed and backing clusters read as qemu-img reads them" ||
		fail "zcq: the first read differs from qemu-img's view"
	fio_verify zcq zcq /data/zcq.log --iodepth=32 --rw=randrw --bsrange=512-128k --size=128m \
		--io_size=16m
	sum=$(md5sum <"$DEV" | cut -d' ' -f1)
	"$B" del -n "$ID" || fail "zcq: del"
	gone zcq || return

	add -q 2 --no-zero-copy /data/zcq.qcow2 || { fail "zcq nozc: add"; return; }
	"$B" list -n "$ID" | grep features | grep -qw AUTO_BUF_REG &&
		fail "zcq nozc: --no-zero-copy device uses AUTO_BUF_REG"
	[ "$(md5sum <"$DEV" | cut -d' ' -f1)" = "$sum" ] &&
		pass "zcq nozc: reads what zero copy read" || fail "zcq nozc: reads differ from zero copy's"
	fio_verify "zcq nozc" zcq /data/zcq.log --iodepth=32 --rw=randrw --bsrange=512-128k \
		--size=128m --io_size=8m
	sum=$(md5sum <"$DEV" | cut -d' ' -f1)
	"$B" del -n "$ID" || fail "zcq nozc: del"
	gone "zcq nozc" || return

	add /data/zcq.qcow2 || { fail "zcq again: add"; return; }
	md5sum <"$DEV" | cut -d' ' -f1 >/data/zcq.md5
	[ "$(cat /data/zcq.md5)" = "$sum" ] && pass "zcq again: zero copy reads what --no-zero-copy read" ||
		fail "zcq again: zero copy reads differ from --no-zero-copy's"
	"$B" del -n "$ID" || fail "zcq again: del"
	gone "zcq again" || return

	# An empty image: writes into fresh clusters (whole ones, or past the
	# end of the file) need no bytes but the request's, so with zero copy
	# they go from the request's pages too; the rest falls back.
	add -q 2 /data/zcqe.qcow2 || { fail "zcq empty: add"; return; }
	fio_verify "zcq empty" zcqe /data/zcqe.log --iodepth=32 --rw=write --bs=64k --size=32m
	fio_verify "zcq empty" zcqe /data/zcqe.log --iodepth=32 --rw=randwrite --bsrange=4k-256k \
		--size=64m --io_size=12m
	md5sum <"$DEV" | cut -d' ' -f1 >/data/zcqe.md5
	"$B" del -n "$ID" || fail "zcq empty: del"
	gone "zcq empty"
}

# The null target: everything completes at once.
null_test() {
	say "null: -t null"
	add -t null --size 1G || { fail "null: add"; return; }
	fio --name=null --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=32 \
		--rw=randrw --bs=4k --size=1g --time_based --runtime=3 >/data/null.log 2>&1 &&
		pass "null: fio randrw" || fail "null: fio"
	grep -E 'IOPS' /data/null.log
	"$B" del -n "$ID" || fail "null: del"
	gone null
}

# An image that cannot be opened creates no device.
bad_test() {
	say "bad: add of a broken and of a missing image"
	n=$(ls /sys/class/ublk-char | wc -l)
	"$B" add /data/bad.qcow2 && fail "bad: add of a broken image succeeded"
	"$B" add /data/missing.qcow2 && fail "bad: add of a missing image succeeded"
	[ "$(ls /sys/class/ublk-char | wc -l)" = "$n" ] &&
		pass "bad: no device for images that cannot be opened" ||
		fail "bad: a device was created"
	"$B" del -a
}

# A corrupt L2 entry: that read fails with EIO, the rest is served, no crash.
corrupt_test() {
	say "corrupt: a read through a corrupt L2 entry"
	add /data/corrupt.qcow2 || { fail "corrupt: add"; return; }
	dd if="$DEV" of=/dev/null bs=64k count=1 iflag=direct 2>/dev/null &&
		fail "corrupt: the read of the corrupt cluster succeeded"
	dd if="$DEV" of=/dev/null bs=64k count=1 skip=16 iflag=direct 2>/dev/null ||
		fail "corrupt: a read elsewhere failed"
	# Writes now fail before they ask for their data: each must still end.
	write_refused corrupt "a write to a corrupt image" bs=4k count=40 seek=100
	dd if="$DEV" of=/dev/null bs=64k count=1 skip=16 iflag=direct 2>/dev/null ||
		fail "corrupt: a read after refused writes failed"
	"$B" list -n "$ID" | grep -q LIVE || fail "corrupt: the daemon did not survive"
	"$B" del -n "$ID" || fail "corrupt: del"
	gone corrupt && pass "corrupt: EIO for the bad cluster, daemon survived, del works"
}

# An L2 entry that points at the L1 table: that write fails with EIO (the
# overlap check), the image is marked corrupt, reads go on, no crash. And
# add --no-backing refuses an image that names a backing file.
overlap_test() {
	say "overlap: a write that would overwrite the L1 table"
	add /data/overlap.qcow2 || { fail "overlap: add"; return; }
	write_refused overlap "the write onto the L1 table" bs=4k count=1
	dd if="$DEV" of=/dev/null bs=64k count=1 skip=1 iflag=direct 2>/dev/null ||
		fail "overlap: a read elsewhere failed"
	"$B" list -n "$ID" | grep -q LIVE || fail "overlap: the daemon did not survive"
	"$B" del -n "$ID" || fail "overlap: del"
	gone overlap && pass "overlap: EIO for the write onto metadata, daemon survived, del works"
	"$B" add --no-backing /data/nb.qcow2 2>/data/nb.err &&
		{ fail "overlap: add --no-backing of an image with a backing file succeeded"; "$B" del -a; }
	grep -q "backing" /data/nb.err &&
		pass "overlap: add --no-backing refused ($(head -n1 /data/nb.err))"
}

# SIGTERM: a clean stop, the image flushed and the device deleted.
term_test() {
	say "term: SIGTERM to the daemon"
	add /data/term.qcow2 || { fail "term: add"; return; }
	pid=$(sed -n 's/^pid=//p' "/run/ublk-qcow2/$ID.info")
	dd if=/dev/urandom of="$DEV" bs=64k count=64 2>/dev/null
	kill -TERM "$pid"
	wait_exit "$pid" 60 "term: daemon" || return
	gone term && pass "term: daemon exited, device gone"
}

# Background writes that the tests below interrupt.
fio_bg() { # NAME
	fio --name="$1" --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=32 \
		--rw=randwrite --bs=4k --size=256m --time_based --runtime=120 \
		>"/data/$1.fio" 2>&1 &
	FIO=$!
	wait_writes "$DEV" 60 || fail "$1: no write reached the device"
}

del_test() {
	say "del: del during fio"
	add /data/del.qcow2 || { fail "del: add"; return; }
	fio_bg del
	timeout 120 "$B" del -n "$ID" || fail "del: del exit $?"
	wait_exit "$FIO" 60 "del: fio" || return
	grep -m2 -i 'error' /data/del.fio
	gone del && pass "del: device gone, fio ended"
	qemu-img check -q /data/del.qcow2 || fail "del: qemu-img check"
}

kill_test() {
	say "kill: kill -9 of the daemon during fio"
	add /data/kill.qcow2 || { fail "kill: add"; return; }
	pid=$(sed -n 's/^pid=//p' "/run/ublk-qcow2/$ID.info")
	fio_bg kill
	kill -9 "$pid"
	wait_exit "$pid" 30 "kill: daemon" || return
	wait_exit "$FIO" 60 "kill: fio" || return
	grep -m2 -i 'error' /data/kill.fio
	refused kill "not added with --recovery" "$B" recover -n "$ID"
	timeout 120 "$B" del -n "$ID" || fail "kill: del exit $?"
	gone kill && pass "kill: device gone, fio ended"
}

# refused NAME WHY CMD...: CMD must fail with exit 1 and one line saying WHY.
refused() {
	name=$1 why=$2
	shift 2
	out=$("$@" 2>&1)
	rc=$?
	if [ $rc = 1 ] && [ "$(echo "$out" | wc -l)" = 1 ] && echo "$out" | grep -q "$why"; then
		pass "$name: '$*' refused: $out"
	else
		fail "$name: '$*' exit $rc, wanted 1 and one line with '$why': $out"
	fi
}

# state_wait STATE SECS: wait until list shows the device in STATE.
state_wait() {
	i=0
	while [ $i -lt $(($2 * 10)) ]; do
		"$B" list -n "$ID" | grep -q "state $1 " && return 0
		sleep 0.1
		i=$((i + 1))
	done
	return 1
}

# USER_RECOVERY: kill -9 of the daemon while fio writes with verify; the
# device waits (QUIESCED), recover serves it again and fio's verify of every
# block written, before and after the kill, passes. The host compares the
# device's contents with qemu-img's and checks the image.
recover_test() {
	say "recover: kill -9 of a --recovery daemon during fio verify, then recover"
	refused recover "no ublk device" "$B" recover -n 999
	add --recovery -q 2 /data/recover.qcow2 || { fail "recover: add --recovery"; return; }
	"$B" list -n "$ID"
	"$B" list -n "$ID" | grep -q ' USER_RECOVERY_REISSUE' ||
		fail "recover: list shows no USER_RECOVERY_REISSUE"
	pid=$(sed -n 's/^pid=//p' "/run/ublk-qcow2/$ID.info")
	refused recover "live daemon" "$B" recover -n "$ID"
	kill_under_fio recover recover 192m || return
	if state_wait QUIESCED 30; then
		pass "recover: device QUIESCED after kill -9"
	else
		fail "recover: device not QUIESCED after kill -9"; "$B" list -n "$ID"
	fi
	t0=$(date +%s)
	out=$(timeout 120 "$B" recover -n "$ID" 2>&1)
	rc=$?
	if [ $rc = 0 ] && [ "$out" = "$DEV" ]; then
		pass "recover: recover -n $ID printed $out ($(($(date +%s) - t0)) s)"
	else
		fail "recover: recover exit $rc: $out"
	fi
	"$B" list -n "$ID"
	npid=$(sed -n 's/^pid=//p' "/run/ublk-qcow2/$ID.info")
	[ -n "$npid" ] && [ "$npid" != "$pid" ] && state_wait LIVE 5 ||
		fail "recover: not LIVE with a new daemon (pid $pid -> ${npid:-none})"
	# Again at once, without waiting for QUIESCED (6.1 notices a dead
	# daemon only every 5 s): recover waits for the kernel by itself.
	# Killed once the new daemon has completed writes of its own.
	wait_writes "$DEV" 60 "$(writes_done "$DEV")" ||
		fail "recover: no write completed after the recover"
	kill -9 "$npid"
	wait_exit "$npid" 30 "recover: second daemon" || return
	out=$(timeout 120 "$B" recover -n "$ID" 2>&1)
	rc=$?
	[ $rc = 0 ] && [ "$out" = "$DEV" ] && pass "recover: second kill -9 and recover at once" ||
		fail "recover: second recover exit $rc: $out"
	[ -e /data/recover.rc ] && fail "recover: fio ended before the second kill (raise --size)"
	fio_bg_result recover recover || return
	md5sum <"$DEV" | cut -d' ' -f1 >/data/recover.md5
	"$B" del -n "$ID" || fail "recover: del"
	gone recover
}

# wait_parts: the kernel's partitions of $DEV (p1, p2) show up as nodes.
wait_parts() {
	i=0
	while { [ ! -b "${DEV}p1" ] || [ ! -b "${DEV}p2" ]; } && [ $i -lt 50 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	[ -b "${DEV}p1" ] && [ -b "${DEV}p2" ]
}

# A GPT with two ext4 partitions made on the device: the kernel shows
# /dev/ublkbNp1 and p2; after del, add --read-only shows them again and the
# files read back (the host then reads the table and a file itself). The
# second add runs with -v under syslogd: the detached daemon's debug lines
# must reach syslog.
gpt_test() {
	say "gpt: a GPT with two ext4 partitions, then read-only"
	add /data/gpt.qcow2 || { fail "gpt: add"; return; }
	printf 'label: gpt\nsize=24MiB, name=one\nname=two\n' | sfdisk -q "$DEV" ||
		{ fail "gpt: sfdisk $DEV"; "$B" del -n "$ID"; return; }
	if wait_parts; then pass "gpt: ${DEV}p1 and ${DEV}p2 appeared"
	else fail "gpt: no partitions after sfdisk ($(ls /dev/ublkb*))"; "$B" del -n "$ID"; return; fi
	for p in 1 2; do
		mkdir -p "/mnt/gpt$p"
		mkfs.ext4 -q -F "${DEV}p$p" && mount -t ext4 "${DEV}p$p" "/mnt/gpt$p" ||
			{ fail "gpt: mkfs/mount ${DEV}p$p"; continue; }
		echo "partition $p" >"/mnt/gpt$p/hello.txt"
		dd if=/dev/urandom of="/mnt/gpt$p/data.bin" bs=64k count=$((16 * p)) 2>/dev/null
		(cd "/mnt/gpt$p" && md5sum hello.txt data.bin) >"/data/gpt$p.md5"
		umount "/mnt/gpt$p" || fail "gpt: umount ${DEV}p$p"
	done
	if "$B" list -n "$ID" --output=json | grep -q "\"device\": \"$DEV\""; then
		pass "gpt: list --output=json names $DEV"
	else fail "gpt: list --output=json does not name $DEV"; fi
	"$B" del -n "$ID" || fail "gpt: del"
	gone gpt || return

	syslogd -O /tmp/gpt.syslog
	DEV=$("$B" -v add --read-only /data/gpt.qcow2 2>/data/gpt.err) ||
		{ fail "gpt: add --read-only ($(cat /data/gpt.err))"; return; }
	ID=${DEV#/dev/ublkb}
	if wait_parts; then pass "gpt: read-only ${DEV}p1 and ${DEV}p2 appeared"
	else fail "gpt: no partitions on the read-only device"; "$B" del -n "$ID"; return; fi
	for p in 1 2; do
		mount -t ext4 -o ro "${DEV}p$p" "/mnt/gpt$p" || { fail "gpt: mount -o ro ${DEV}p$p"; continue; }
		if (cd "/mnt/gpt$p" && md5sum -c -s "/data/gpt$p.md5"); then
			pass "gpt: partition $p reads back read-only"
		else fail "gpt: partition $p differs"; fi
		touch "/mnt/gpt$p/new" 2>/dev/null && fail "gpt: a write to read-only partition $p worked"
		umount "/mnt/gpt$p"
	done
	[ "$(blockdev --getro "${DEV}p1")" = 1 ] || fail "gpt: ${DEV}p1 is not read-only"
	"$B" del -n "$ID" || fail "gpt: read-only del"
	gone gpt
	# the daemon's lines are in syslog; the foreground part stayed on stderr
	if grep -q "ublk-qcow2\[[0-9]*\]: debug: add: $DEV is live" /tmp/gpt.syslog; then
		pass "gpt: the detached daemon logs to syslog"
	else
		fail "gpt: no daemon line in syslog: $(tail -n 3 /tmp/gpt.syslog)"
	fi
	grep -q "debug: add: created" /data/gpt.err || fail "gpt: -v printed no debug line on stderr"
	killall syslogd 2>/dev/null
}

# ublk-qcow2@.service as systemd runs it: the unit's ExecStart line with the
# variables of its /etc/ublk-qcow2/NAME.conf ($OPTIONS split at spaces), in
# the foreground; "systemctl stop" is SIGTERM: exit 0, device gone, the data
# on disk (the host reads it back with qemu-io).
unit_test() {
	say "unit: ublk-qcow2@.service's ExecStart, stopped with SIGTERM"
	cmd=$(sed -n 's/^ExecStart=//p' /data/ublk-qcow2@.service)
	[ -n "$cmd" ] || { fail "unit: no ExecStart in the unit"; return; }
	# systemd's EnvironmentFile: KEY=VALUE lines, the value taken whole
	while IFS= read -r l; do
		case $l in
		'#'* | '') ;;
		*=*) export "${l%%=*}=${l#*=}" ;;
		esac
	done </data/unit.conf
	# exec: the daemon itself gets the signal, as under systemd (no shell)
	eval "exec $cmd" >/data/unit.out 2>/data/unit.err &
	pid=$!
	DEV=/dev/ublkb7 ID=7
	i=0
	while [ ! -b "$DEV" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
	[ -b "$DEV" ] || { fail "unit: no $DEV ($(cat /data/unit.err))"; kill "$pid"; return; }
	"$B" list -n 7 | grep -q "queues 2" || fail "unit: OPTIONS (-q 2) not applied: $("$B" list -n 7)"
	dd if=/dev/zero bs=1M count=4 2>/dev/null | tr '\0' '\125' |
		dd of="$DEV" bs=1M seek=1 oflag=direct 2>/dev/null || fail "unit: write"
	kill -TERM "$pid"
	# wait_exit reaps without the status: poll, then wait for it here
	i=0
	while [ $i -lt 600 ]; do
		case $(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$pid/status" 2>/dev/null) in
		'' | Z) break ;;
		esac
		sleep 0.1
		i=$((i + 1))
	done
	[ $i -lt 600 ] || { fail "unit: the daemon hung after SIGTERM"; return; }
	wait "$pid"
	rc=$?
	[ "$rc" = 0 ] || fail "unit: exit $rc after SIGTERM ($(cat /data/unit.err))"
	[ "$(cat /data/unit.out)" = "$DEV" ] || fail "unit: printed '$(cat /data/unit.out)'"
	gone unit && pass "unit: served /dev/ublkb7 in the foreground, SIGTERM stopped it cleanly"
}

"$B" features
[ $# -gt 0 ] || set -- ext4 xfs fio cow getdata snap overlay extl2 luks ro discard raw null bad corrupt \
	overlap term del kill recover gpt unit zc zcq tmpfs enospc probe
for t in "$@"; do
	case $t in
	ext4) fs_test ext4 ext4 /data/ext4.qcow2 ;;
	xfs) fs_test xfs xfs /data/xfs.qcow2 ;;
	fio) fio_test ;;
	cow) cow_test ;;
	getdata) getdata_test ;;
	snap) snap_test ;;
	overlay) overlay_test ;;
	extl2) img_test extl2 /data/extl2.qcow2 ;;
	luks)
		img_test luks /data/luks.qcow2 --key-secret uq-secret
		add /data/luks.qcow2 --key-secret wrong 2>/data/luks.err &&
			{ fail "luks: add with a wrong key succeeded"; "$B" del -n "$ID"; }
		grep -q . /data/luks.err && pass "luks: a wrong key is refused ($(head -n1 /data/luks.err))"
		luks_chain_test
		;;
	ro) ro_test ;;
	discard) discard_test ;;
	raw) raw_test ;;
	probe) probe_test ;;
	zc) zc_test ;;
	zcq) zcq_test ;;
	tmpfs) tmpfs_test ;;
	enospc) enospc_test tmpfs; enospc_test ext4 ;;
	null) null_test ;;
	bad) bad_test ;;
	corrupt) corrupt_test ;;
	overlap) overlap_test ;;
	term) term_test ;;
	del) del_test ;;
	kill) kill_test ;;
	recover) recover_test ;;
	gpt) gpt_test ;;
	unit) unit_test ;;
	*) fail "unknown scenario $t" ;;
	esac
done
for f in /run/ublk-qcow2/*.log; do
	[ -s "$f" ] && { echo "---- $f"; cat "$f"; }
done
"$B" del -a
! grep -q '^FAIL' "$R"
