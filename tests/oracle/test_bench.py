#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""`bench` does the I/O it claims, as qemu-img bench would: a write run with
--pattern leaves exactly the pattern where qemu-img bench's offsets fall
(step, wrap-around, flush interval), the image checks clean, and a read run
of a raw and a qcow2 image completes; bad options get one error line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import uqtest

MiB = 1 << 20

# Write runs on raw images, ours and qemu-img bench's, compared byte for
# byte: (FILE SIZE, ARGS). Sizes not a multiple of 512 read as whole sectors
# (a write into the partial last one grows the file); a request past the end
# fails the run, after the ones before it. Runs that fail use -d 1: qemu-img's
# other requests in flight may land or not.
RAW_WRITES = [
    (MiB, ["-c", "300", "--pattern=7"]),
    (MiB, ["-c", "300", "--pattern=7", "-t", "writeback", "-i", "threads"]),
    (MiB, ["-c", "100", "-d", "4", "-s", "8k", "-S", "12k", "-o", "4k", "--pattern=51",
           "--flush-interval=8"]),
    (MiB, ["-c", "1000", "-d", "16", "--flush-interval=16", "--pattern=200"]),
    (MiB, ["-c", "400", "-d", "1", "-S", "3000", "--pattern=5"]),
    (MiB, ["-c", "3", "-d", "1", "-o", "1020k", "-s", "8k", "--pattern=5"]),
    (MiB, ["-c", "20", "-d", "5000", "--pattern=9"]),
    (MiB, ["-c", "2", "-s", "0", "--pattern=9"]),
    (1000, ["-c", "2", "-d", "1", "-s", "512", "--pattern=9"]),
    (1000, ["-c", "5", "-d", "1", "-s", "100", "-S", "300", "--pattern=9"]),
    (1000, ["-c", "3", "-d", "1", "-s", "600", "--pattern=9"]),
]

# -w -t none on raw files of odd sizes: qemu-img refuses a size (in whole
# sectors) that is not a multiple of the file's O_DIRECT alignment (512 on
# ext4, 4096 on tmpfs), before writing anything. Run on tmpfs and on ext4.
RAW_DIRECT_SIZES = [
    (1000, ["-c", "3", "-d", "1", "-s", "512", "--pattern=3", "-t", "none"]),
    (1536, ["-c", "3", "-d", "1", "-s", "512", "--pattern=3", "-t", "none"]),
    (5120, ["-c", "3", "-d", "1", "-s", "100", "--pattern=3", "-t", "none"]),
    (8192, ["-c", "9", "-d", "2", "-s", "1k", "--pattern=3", "-t", "directsync"]),
]


def case_write(d, extra, c):
    img = os.path.join(d, "w.qcow2")
    ref = os.path.join(d, "ref.qcow2")
    try:
        for p in (img, ref):
            uqtest.qemu_create(p, 4 * MiB, cluster_size=c)
        args = ["-w", "--pattern=90", "-c", "300", "-d", "8", "-s", "12k", "-S", "20k",
                "-o", "4096"] + extra
        p = uqtest.uq("bench", *args, img)
        if "Run completed in" not in p.stdout:
            return f"no completion line: {p.stdout!r}"
        uqtest.qemu_img("bench", "-f", "qcow2", *args, ref)
        p = uqtest.qemu_img("compare", img, ref, check=False)
        if p.returncode != 0:
            return f"differs from qemu-img bench's result: {(p.stdout + p.stderr).strip()}"
        p = uqtest.qemu_img("check", img, check=False)
        if p.returncode != 0:
            return f"qemu-img check exits {p.returncode}: {uqtest.tail(p.stdout, 5)}"
        return None
    finally:
        for p in (img, ref):
            if os.path.exists(p):
                os.unlink(p)


def on_disk(base, fn):
    """fn(img, ref) on two fresh 64 MiB images in a scratch directory on
    @base (a disk-backed file system: on tmpfs nothing is grown ahead)."""
    d = tempfile.mkdtemp(prefix="uq-grow-", dir=base)
    try:
        img, ref = os.path.join(d, "g.qcow2"), os.path.join(d, "ref.qcow2")
        for p in (img, ref):
            uqtest.qemu_create(p, 64 * MiB)
        return fn(img, ref)
    finally:
        shutil.rmtree(d)


def bench_both(img, ref, args):
    """Ours on @img and qemu-img bench on @ref, -t none: None if they agree."""
    uqtest.uq("bench", "-t", "none", *args, img)
    uqtest.qemu_img("bench", "-f", "qcow2", "-t", "none", *args, ref)
    p = uqtest.qemu_img("compare", img, ref, check=False)
    if p.returncode != 0:
        return f"differs from qemu-img bench's result: {(p.stdout + p.stderr).strip()}"
    return None


def grow(img, ref):
    """O_DIRECT allocating writes on a disk-backed file system: the engine
    reserves the file ahead with fallocate (tmpfs is left alone) and gives
    back what it did not use at close, so the file ends in the image's last
    cluster as qemu-img check sees it, and the data is qemu-img bench's."""
    bad = bench_both(img, ref, ["-w", "--pattern=77", "-c", "900", "-d", "32", "-s", "4k",
                                "-S", "68k"])
    bad = bad or uqtest.qemu_check_clean("after bench -t none", img)
    if bad:
        return bad
    end = json.loads(uqtest.qemu_img("check", "--output=json", img).stdout)["image-end-offset"]
    size = os.path.getsize(img)
    # The last cluster may be written only up to its data (the rest reads
    # as zeros past the end of the file), as without growing ahead.
    if not end - 65536 < size <= end:
        return f"file is {size} bytes, the image ends at {end}: reserved space left behind"
    return None


def grow_killed(img, ref):
    """A bench killed mid-run while the file is grown ahead leaves the
    reserved tail behind, which must read as nothing: qemu-img check finds no
    corruption, and a second run over every offset on the reopened image
    gives exactly qemu-img bench's result, clean."""
    shape = ["-w", "-d", "32", "-s", "4k", "-S", "64k"]
    first = subprocess.Popen([uqtest.uq_bin(), "bench", "-t", "none", "--pattern=77",
                              "-c", "2000000", *shape, img],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    _, err = first.communicate()
    if first.returncode != -signal.SIGKILL:
        return f"the first bench ended before the kill (exit {first.returncode}): {err!r}"
    p = uqtest.qemu_img("check", img, check=False)
    if p.returncode not in (0, 3):
        return f"after the kill qemu-img check exits {p.returncode}: {uqtest.tail(p.stdout, 5)}"
    uqtest.uq("check", "-r", "leaks", img, check=False)
    return (bench_both(img, ref, ["--pattern=88", "-c", "1024", *shape]) or
            uqtest.qemu_check_clean("after the second bench", img))


def case_read(d, fmt):
    img = os.path.join(d, "r." + fmt)
    uqtest.qemu_img("create", "-q", "-f", fmt, img, str(8 * MiB))
    uqtest.qemu_io(fmt, img, ["write -P 0x11 0 8M"])
    p = uqtest.uq("bench", "-f", fmt, "-c", "5000", "-d", "16", "-t", "none", img)
    os.unlink(img)
    if "Sending 5000 read requests, 4096 bytes each, 16 in parallel" not in p.stdout:
        return f"unexpected output: {p.stdout!r}"
    return None


def case_raw_write(d, size, args):
    """bench -w on a raw file: the exit status, the bytes and the size of
    the file are qemu-img bench -w's."""
    ours, ref = os.path.join(d, "rw.raw"), os.path.join(d, "rw-ref.raw")
    with open(ours, "wb") as f:
        f.write(os.urandom(size))
    shutil.copyfile(ours, ref)
    try:
        p = uqtest.uq("bench", "-f", "raw", "-w", *args, ours, check=False)
        q = uqtest.qemu_img("bench", "-f", "raw", "-w", *args, ref, check=False)
        if p.returncode != q.returncode:
            return f"exit {p.returncode}, qemu-img bench {q.returncode}: {p.stderr!r}"
        if p.returncode and len(p.stderr.strip().splitlines()) != 1:
            return f"not one error line: {p.stderr!r}"
        return uqtest.file_mismatch(ours, ref, "qemu-img bench")
    finally:
        for f in (ours, ref):
            os.unlink(f)


def case_limits(d):
    """qemu-img bench's limits on -d and -s: any depth and size that fit an
    int, -s 0 included. It allocates DEPTH x SIZE in one int-sized buffer
    and crashes past 2 GiB; we refuse that with one line, before allocating."""
    img = os.path.join(d, "l.raw")
    uqtest.qemu_img("create", "-q", "-f", "raw", img, str(256 * MiB))
    try:
        for args in (["-d", "5000"], ["-d", "65536"], ["-s", "0"], ["-s", "128M", "-d", "1"],
                     ["-w", "-s", "128M", "-d", "1", "-S", "0"]):
            p = uqtest.uq("bench", "-c", "2", *args, img, check=False)
            q = uqtest.qemu_img("bench", "-f", "raw", "-c", "2", *args, img, check=False)
            if p.returncode != 0 or q.returncode != 0 or "Run completed in" not in p.stdout:
                return (f"bench {' '.join(args)}: exit {p.returncode} (qemu-img "
                        f"{q.returncode}): {p.stderr!r}")
        for args in (["-d", "2147483648"], ["-s", "2G"], ["-d", "0"], ["-s", "128M"],
                     ["-d", "2147483647"], ["-d", "65536", "-s", "1G"]):
            p = uqtest.uq("bench", "-c", "2", *args, img, check=False, mem_limit=1 << 30)
            lines = p.stderr.strip().splitlines()
            if p.returncode != 1 or len(lines) != 1 or "bench:" not in lines[0]:
                return f"bench {' '.join(args)}: exit {p.returncode}, stderr {p.stderr!r}"
        return None
    finally:
        os.unlink(img)


def case_aio_native(d):
    """-i native / -n need -t none or directsync, as qemu-img bench's open
    demands; a later -i threads does not take native back."""
    img = os.path.join(d, "n.qcow2")
    uqtest.qemu_create(img, MiB)
    for args in (["-i", "native"], ["-n", "-t", "writeback"], ["-i", "native", "-i", "threads"],
                 ["-i", "native", "-t", "none"], ["-n", "-t", "directsync"],
                 ["-w", "-i", "threads", "-t", "none"]):
        p = uqtest.uq("bench", "-c", "10", *args, img, check=False)
        q = uqtest.qemu_img("bench", "-c", "10", *args, img, check=False)
        if p.returncode != q.returncode or (p.returncode and
                                             len(p.stderr.strip().splitlines()) != 1):
            return (f"bench {' '.join(args)}: exit {p.returncode} (qemu-img {q.returncode}): "
                    f"{p.stderr!r}")
    return uqtest.qemu_check_clean("after bench", img)


def case_bad(d):
    img = os.path.join(d, "b.qcow2")
    uqtest.qemu_create(img, MiB)
    for args in (["-d", "x"], ["--flush-interval=4"], ["-w", "--flush-interval=4"],
                 ["-t", "bogus"],
                 ["-o", "2M"]):
        p = uqtest.uq("bench", *args, img, check=False)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        if p.returncode == 0 or len(lines) != 1:
            return f"bench {' '.join(args)}: exit {p.returncode}, stderr {p.stderr!r}"
    return None


def case_count_zero(d):
    """-c 0 sends nothing and completes, as qemu-img bench."""
    img = os.path.join(d, "c0.qcow2")
    uqtest.qemu_create(img, MiB)
    for args in (["-c", "0"], ["-w", "-c", "0"]):
        ours, theirs = (uqtest.uq("bench", *args, img, check=False),
                        uqtest.qemu_img("bench", *args, img, check=False))
        if ours.returncode != theirs.returncode or "Run completed in" not in ours.stdout:
            return f"bench {' '.join(args)}: exit {ours.returncode} (qemu-img {theirs.returncode}): {ours.stdout!r} {ours.stderr!r}"
    return uqtest.qemu_check_clean("after bench -c 0", img)


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    res = uqtest.Results("test_bench")
    d = uqtest.scratch_dir("bench")
    try:
        res.case("write pattern, step, wrap (64k clusters)", case_write, d, [], 65536)
        res.case("write with --flush-interval=9 (4k clusters)", case_write, d,
                 ["--flush-interval=9"], 4096)
        res.case("write -t none on a disk-backed file system (the file grown ahead)",
                 on_disk, "/var/tmp", grow)
        res.case("bench -t none killed while growing ahead, then run again",
                 on_disk, "/var/tmp", grow_killed)
        res.case("read qcow2", case_read, d, "qcow2")
        res.case("read raw", case_read, d, "raw")
        for size, args in RAW_WRITES:
            res.case(f"write raw as qemu-img bench: {size} bytes, {' '.join(args)}",
                     case_raw_write, d, size, args)
        # O_DIRECT on a disk file system (tmpfs may refuse it).
        disk = tempfile.mkdtemp(prefix="uq-rawdio-", dir="/var/tmp")
        try:
            for size, args in RAW_WRITES[:4]:
                res.case(f"write raw -t none on /var/tmp: {' '.join(args)}",
                         case_raw_write, disk, size, args + ["-t", "none"])
            for size, args in RAW_DIRECT_SIZES:
                for where in (d, disk):
                    res.case(f"write raw in {where}: {size} bytes, {' '.join(args)}",
                             case_raw_write, where, size, args)
        finally:
            shutil.rmtree(disk)
        res.case("-d and -s limits as qemu-img bench's", case_limits, d)
        res.case("-i native needs -t none, as qemu-img's", case_aio_native, d)
        res.case("bad options", case_bad, d)
        res.case("-c 0", case_count_zero, d)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
