#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Run a script inside a test-kernel VM (qemu-system-x86_64, TCG) and bring /data back.
#
#   kernel/vm-run.sh [options] --data DIR -- SCRIPT [ARGS...]
#   kernel/vm-run.sh [options] [--data DIR] --shell       (interactive shell on the console;
#                                                           exit it, or Ctrl-A X, to stop)
#
# Options:
#   --kernel 6.1|6.12|sid   test kernel (default 6.12; fetched on first use)
#   --mem MB                guest memory (default 2048)
#   --cpus N                vCPUs (default 2)
#   --timeout SEC           wall-clock limit from qemu's start to its end (default 600)
#   --data DIR              packed into an ext4 disk (/dev/vda), mounted at /data in the
#                           guest (the script's working directory); after the run the
#                           guest's /data replaces DIR's contents (see --out); runs of
#                           zeros in files come back as holes (sparse)
#   --data-size SIZE        size of that disk (default: 2 x (files, qcow2 images counted
#                           at their virtual size) + 1 GiB; sparse; k/M/G suffixes)
#   --out OUTDIR            copy the guest's /data to OUTDIR instead of back into DIR
#   --no-copy-back          leave DIR as it was
#   --disk FILE             attach FILE as one more raw virtio disk (/dev/vdb, /dev/vdc...)
#   --bin PATH              ublk-qcow2 binary for /usr/bin/ublk-qcow2 (default: $UQ_BIN,
#                           else build/ublk-qcow2 when it exists)
#   -e NAME=VALUE           export NAME in the guest script's environment
#   --append ARGS           extra kernel command line
#   -v, --verbose           echo the guest console while it runs
#
# The script runs as root in /data with ARGS: with the interpreter its #! line names
# (/bin/bash and /bin/sh are there), else with /bin/sh (dash); with
# UQ_KERNEL (6.1|6.12|sid) and UQ_VM=1 in its environment. vm-run.sh exits with the
# script's exit status; 124 when the VM ran past --timeout, 125 when the VM failed
# (no boot, kernel panic/oops, qemu error); the guest console is then printed.
# The console log is kept in kernel/out/last-console-KERNEL.log. The run directory
# (initrd, data disk, console log) lives in /dev/shm/uq-vm-runs/ when tmpfs has room
# for the whole data disk, else in kernel/out/runs/ ($UQ_VM_TMPDIR overrides);
# UQ_VM_KEEP=1 keeps it.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "$0")/lib.sh"

die() { echo "vm-run.sh: $*" >&2; exit 125; }

k=6.12 mem=2048 cpus=2 timeout=600 data='' data_size='' outdir='' copy_back=1 shell=0 verbose=0
append='' bin=${UQ_BIN:-}
disks=() envs=()
while [ $# -gt 0 ]; do
	case $1 in
	--kernel) k=$2; shift 2 ;;
	--mem) mem=$2; shift 2 ;;
	--cpus) cpus=$2; shift 2 ;;
	--timeout) timeout=$2; shift 2 ;;
	--data) data=$2; shift 2 ;;
	--data-size) data_size=$2; shift 2 ;;
	--out) outdir=$2; shift 2 ;;
	--no-copy-back) copy_back=0; shift ;;
	--disk) disks+=("$2"); shift 2 ;;
	--bin) bin=$2; shift 2 ;;
	-e) [[ $2 == [A-Za-z_]*=* ]] || die "-e wants NAME=VALUE"; envs+=("$2"); shift 2 ;;
	--append) append=$2; shift 2 ;;
	--shell) shell=1; shift ;;
	-v | --verbose) verbose=1; shift ;;
	-h | --help) awk 'NR > 2 && !/^#/ { exit } NR > 2 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
	--) shift; break ;;
	*) die "unknown option '$1' (see --help)" ;;
	esac
done
if [ "$shell" = 0 ]; then
	[ $# -ge 1 ] || die "usage: vm-run.sh [options] --data DIR -- SCRIPT [ARGS...] (see --help)"
	script=$1
	shift
	[ -f "$script" ] || die "no script '$script'"
fi
[[ $mem =~ ^[0-9]+$ && $cpus =~ ^[0-9]+$ && $timeout =~ ^[0-9]+$ ]] ||
	die "--mem, --cpus and --timeout take numbers"
if [ -z "$bin" ] && [ -x "$kit/../build/ublk-qcow2" ]; then bin=$kit/../build/ublk-qcow2; fi
if [ -n "$bin" ]; then [ -x "$bin" ] || die "--bin '$bin' is not an executable"; fi
if [ -n "$data" ]; then [ -d "$data" ] || die "--data '$data' is not a directory"; fi
for d in "${disks[@]}"; do [ -f "$d" ] || die "--disk '$d' is not a file"; done
command -v qemu-system-x86_64 >/dev/null || die "no qemu-system-x86_64: run kernel/setup.sh"

kdir=$(kernel_dir "$k") || die "no kernel $k (kernel/fetch.sh $k failed)"
k=${kdir##*/}

# ---- the data disk ----
size_of_data() { # bytes: regular files at apparent size, qcow2 at max(virtual, apparent)
	local total=0 f sz v
	[ -n "$data" ] || { echo 0; return; }
	while IFS= read -r -d '' f; do
		sz=$(stat -c %s "$f")
		if [ "$(head -c 4 "$f" | od -An -tx1 | tr -d ' \n')" = 514649fb ]; then
			v=$(od -An -tu8 --endian=big -j 24 -N 8 "$f" | tr -d ' ')
			[ "${v:-0}" -gt "$sz" ] && sz=$v
		fi
		total=$((total + sz))
	done < <(find "$data" -type f -print0)
	echo "$total"
}
to_bytes() {
	local n=${1%[kKmMgGtT]} u=${1##*[0-9]}
	[[ $n =~ ^[0-9]+$ ]] || die "bad size '$1'"
	case $u in
	'') echo "$n" ;; k | K) echo $((n << 10)) ;; m | M) echo $((n << 20)) ;;
	g | G) echo $((n << 30)) ;; t | T) echo $((n << 40)) ;;
	esac
}
if [ -n "$data_size" ]; then
	dbytes=$(to_bytes "$data_size")
else
	dbytes=$((2 * $(size_of_data) + (1 << 30)))
fi
dbytes=$(((dbytes + (1 << 20) - 1) >> 20 << 20))
# the run directory (initrd, data disk) on tmpfs when it has room for the whole
# disk: I/O there costs no host disk writeback (UQ_VM_TMPDIR overrides)
rundir=${UQ_VM_TMPDIR:-}
if [ -z "$rundir" ]; then
	rundir=$kout/runs
	if [ -d /dev/shm ] && [ -w /dev/shm ] &&
		[ "$(df -P -B1 /dev/shm 2>/dev/null | awk 'NR == 2 { print $4 }')" -gt $((dbytes + (1 << 30))) ]; then
		rundir=/dev/shm/uq-vm-runs
	fi
fi
mkdir -p "$rundir"
run=$(mktemp -d "$rundir/run.XXXXXX")
qpid=
# shellcheck disable=SC2317 # called through the trap
cleanup() {
	if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then kill -KILL "$qpid" 2>/dev/null || true; fi
	if [ "${UQ_VM_KEEP:-0}" = 1 ]; then
		echo "vm-run.sh: run directory kept: $run" >&2
	else
		rm -rf "$run"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- initramfs: base (cached) + binary + this run's script ----
initrd=$run/initrd
"$kit/initramfs.sh" ${bin:+--bin "$bin"} --out "$initrd" "$k" >/dev/null ||
	die "initramfs.sh failed"
sroot=$run/overlay
mkdir -p "$sroot/etc/uqvm"
{
	echo "export UQ_KERNEL=$(sq "$k") UQ_VM=1"
	for e in "${envs[@]}"; do echo "export ${e%%=*}=$(sq "${e#*=}")"; done
} >"$sroot/etc/uqvm/env"
if [ "$shell" = 1 ]; then
	touch "$sroot/etc/uqvm/shell"
else
	cp "$script" "$sroot/etc/uqvm/script"
	chmod 755 "$sroot/etc/uqvm/script"
	{
		# a script with a #! line runs with that interpreter, any other with /bin/sh
		if [ "$(head -c 2 "$script")" = '#!' ]; then
			printf 'exec /etc/uqvm/script'
		else
			printf 'exec /bin/sh /etc/uqvm/script'
		fi
		for a in "$@"; do printf ' %s' "$(sq "$a")"; done
		echo
	} >"$sroot/etc/uqvm/cmd"
fi
(cd "$sroot" && find etc/uqvm -mindepth 1 | cpio -o -H newc -R 0:0 --quiet) >>"$initrd"

# ---- the data disk ----
disk=$run/data.ext4
mkfs_args=(-q -F -t ext4 -L uqdata -E 'lazy_itable_init=1,lazy_journal_init=1,nodiscard')
[ -z "$data" ] || mkfs_args+=(-d "$data")
truncate -s "$dbytes" "$disk"
mke2fs "${mkfs_args[@]}" "$disk" >"$run/mkfs.log" 2>&1 ||
	{ cat "$run/mkfs.log" >&2; die "mkfs.ext4 -d '$data' failed"; }

# ---- boot ----
log=$run/console.log
qargs=(
	-accel tcg -cpu max -smp "$cpus" -m "$mem" -machine pc
	-nodefaults -no-user-config -nographic -no-reboot
	-kernel "$(kernel_image "$kdir")" -initrd "$initrd"
	-append "console=ttyS0 panic=-1 oops=panic loglevel=5 rdinit=/init ${append}"
	-drive "file=$disk,if=virtio,format=raw,cache=unsafe,discard=unmap,werror=report,rerror=report"
)
for d in "${disks[@]}"; do qargs+=(-drive "file=$d,if=virtio,format=raw,cache=unsafe,discard=unmap,werror=report,rerror=report"); done

echo "vm-run.sh: booting $k ($(cat "$kdir/kver")), ${cpus} vCPU, ${mem} MiB, data disk $((dbytes >> 20)) MiB" >&2
if [ "$shell" = 1 ]; then
	qemu-system-x86_64 "${qargs[@]}" -serial mon:stdio
	rc=0
else
	secs_since() { awk -v a="$EPOCHREALTIME" -v b="$1" 'BEGIN { printf "%.1f", a - b }'; }
	# TCG with several vCPUs sometimes oopses while the kernel patches its own text at
	# boot (int3 in sched_clock_cpu, a GPF in a kworker on 6.12): a VM that dies
	# (oops=panic) or is not up after boot_limit seconds ran none of the script, so
	# it is booted again, twice at most
	boot_limit=$((timeout < 240 ? timeout : 240))
	for attempt in 1 2 3; do
		start=$EPOCHREALTIME
		: >"$log"
		qemu-system-x86_64 "${qargs[@]}" -monitor none -serial "file:$log" </dev/null >"$run/qemu.out" 2>&1 &
		qpid=$!
		tailpid=
		if [ "$verbose" = 1 ]; then
			# without the firmware's terminal escapes and the serial line's CRs
			tail -n +1 -f "$log" --pid="$qpid" |
				sed -u 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g; s/\r//g' >&2 &
			tailpid=$!
		fi
		deadline=$((${start%.*} + timeout))
		booted='' timed_out=0 boot_hung=0
		while kill -0 "$qpid" 2>/dev/null; do
			if [ -z "$booted" ] && grep -q '^uqvm: ready at' "$log"; then
				booted=$(secs_since "$start")
			fi
			if [ -z "$booted" ] && [ "${EPOCHREALTIME%.*}" -ge $((${start%.*} + boot_limit)) ]; then
				boot_hung=1
				kill -KILL "$qpid" 2>/dev/null || true
				break
			fi
			if [ "${EPOCHREALTIME%.*}" -ge "$deadline" ]; then
				timed_out=1
				kill -KILL "$qpid" 2>/dev/null || true
				break
			fi
			sleep 0.2
		done
		qrc=0
		wait "$qpid" || qrc=$?
		qpid=
		[ -z "$tailpid" ] || wait "$tailpid" 2>/dev/null || true
		elapsed=$(secs_since "$start")
		# a VM that died between two polls may have got past init
		if [ -z "$booted" ] && grep -q '^uqvm: ready at' "$log"; then booted=$elapsed; fi
		cp "$log" "$kout/last-console-$k.log"
		tr -d '\r' <"$log" >"$log.txt"
		rcline=$(grep -a -o '@@UQVM-EXIT=[0-9]*@@' "$log.txt" | tail -n1 || true)
		[ "$timed_out" = 0 ] && [ -z "$rcline" ] && [ -z "$booted" ] && [ "$attempt" -lt 3 ] || break
		if [ "$boot_hung" = 1 ]; then
			echo "vm-run.sh: the $k VM was not up ${boot_limit}s after qemu started; booting again" >&2
		else
			echo "vm-run.sh: the $k VM ended (qemu exit $qrc) before init was ready; booting again" >&2
		fi
		[ "$verbose" = 1 ] || { echo "---- guest console ($k, failed boot) ----"; tail -n 40 "$log.txt"; echo "----"; } >&2
	done
	show_console() {
		[ "$verbose" = 1 ] && return 0
		echo "---- guest console ($k) ----" >&2
		cat "$log.txt" >&2
		echo "---- end of guest console ----" >&2
	}
	if [ "$timed_out" = 1 ]; then
		show_console
		echo "vm-run.sh: TIMEOUT: the $k VM ran past ${timeout}s and was killed" >&2
		rc=124
	elif [ -z "$rcline" ]; then
		show_console
		cat "$run/qemu.out" >&2
		if [ -z "$booted" ]; then
			if [ "$boot_hung" = 1 ]; then
				echo "vm-run.sh: BOOT FAILED: the $k VM was not up ${boot_limit}s after qemu started" >&2
			else
				echo "vm-run.sh: BOOT FAILED: the $k VM ended (qemu exit $qrc) before init was ready" >&2
			fi
		else
			echo "vm-run.sh: VM FAILED: the $k VM ended (qemu exit $qrc) without the script's exit status (kernel panic or oops?)" >&2
		fi
		rc=125
	else
		rc=${rcline#@@UQVM-EXIT=}
		rc=${rc%@@}
		[ "$rc" = 0 ] || show_console
		echo "vm-run.sh: $k: script exit $rc; init ready ${booted:-?}s after qemu started, VM total ${elapsed}s" >&2
	fi
fi

# ---- bring /data back (debugfs: no mounts on the host) ----
if [ -n "$data" ] && [ "$copy_back" = 1 ] || [ -n "$outdir" ]; then
	# replays the journal if the guest did not unmount cleanly
	e2fsck -p "$disk" >"$run/fsck.log" 2>&1 || {
		e=$?
		[ "$e" -le 1 ] || { cat "$run/fsck.log" >&2; echo "vm-run.sh: e2fsck of the data disk failed ($e)" >&2; }
	}
	dest=${outdir:-$data}
	mkdir -p "$dest"
	tmp=$(mktemp -d "$dest/.vm-run.XXXXXX")
	# debugfs exits 0 whatever its command did: any line past its banner is an error
	if debugfs -R "rdump / $tmp" "$disk" >"$run/rdump.log" 2>&1 &&
		! grep -qv '^debugfs [0-9]' "$run/rdump.log"; then
		src=$tmp
		# rdump of / writes the root's entries into $tmp (older versions: into $tmp/<name>)
		rm -rf "$src/lost+found"
		# rdump writes holes out as zeros: make them holes again (1 MiB and up)
		if command -v fallocate >/dev/null; then
			find "$src" -type f -size +1M -exec fallocate --dig-holes {} \; 2>/dev/null || true
		fi
		find "$dest" -mindepth 1 -maxdepth 1 ! -path "$tmp" -exec rm -rf {} +
		find "$src" -mindepth 1 -maxdepth 1 -exec mv -t "$dest" {} +
		rmdir "$tmp"
	else
		cat "$run/rdump.log" >&2
		rm -rf "$tmp"
		echo "vm-run.sh: could not copy /data back (debugfs rdump failed)" >&2
		[ "$rc" != 0 ] || rc=125
	fi
fi
exit "$rc"
