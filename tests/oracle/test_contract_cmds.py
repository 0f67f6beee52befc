#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Contract edges of io, bench, snapshot and the device commands that the
other tests leave out, each against qemu-img/qemu-io where they have an
answer: io refuses a LEN beyond the image before allocating a buffer for it;
discard and write -z that run to the end of a disk whose size is not a
cluster multiple take the last cluster whole, as QEMU does; bench -t none
with unaligned requests completes and writes what qemu-img bench writes;
snapshot -l of a raw image lists nothing, as qemu-img; and add, del, list,
recover reject bad arguments, a missing image or snapshot in one line naming
the command or the file, before the ublk driver is asked (so this holds with
or without one)."""

import json
import os
import shutil
import sys
import time

import uqtest

MiB = 1 << 20


def one_line_error(p, what, must=()):
    """None when @p failed with exactly one stderr line holding all of @must."""
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    if p.returncode == 0 or len(lines) != 1:
        return f"{what}: exit {p.returncode}, stderr {p.stderr!r}"
    for m in must:
        if m not in lines[0]:
            return f"{what}: the error line lacks {m!r}: {lines[0]!r}"
    if "ublk-control" in lines[0]:
        return f"{what}: asked the driver before checking: {lines[0]!r}"
    return None


def case_io_huge_len(d):
    img = os.path.join(d, "small.qcow2")
    uqtest.qemu_create(img, MiB)
    before = uqtest.sha256(img)
    for cmd in ("read 0 3G", "write 0 3G", "read 0 1G", "write -P 1 512k 1G", "read 1M 1",
                "write -z 1048575 2", "discard 0 2M"):
        t0 = time.monotonic()
        p = uqtest.uq("io", img, "-c", cmd, check=False, timeout=60)
        secs = time.monotonic() - t0
        err = one_line_error(p, f"io -c '{cmd}'", ["small.qcow2", "beyond the virtual size"])
        if err:
            return err
        if secs > 10:
            return f"io -c '{cmd}' took {secs:.1f} s to refuse"
    if uqtest.sha256(img) != before:
        return "the image changed"
    # Within a big image, qemu-io's 2 GiB cap on one buffer holds.
    big = os.path.join(d, "big.qcow2")
    uqtest.qemu_create(big, 4 << 30)
    p = uqtest.uq("io", big, "-c", "read 0 3G", check=False, timeout=60)
    err = one_line_error(p, "io -c 'read 0 3G' (4G image)", ["length cannot exceed 2147483136"])
    if err:
        return err
    # The edges themselves still work: a zero-length request at the end.
    p = uqtest.uq("io", img, "-c", "read 1M 0", "-c", "write 1048575 1", check=False)
    if p.returncode != 0:
        return f"io at the end of the image: exit {p.returncode}: {p.stderr.strip()}"
    return None


def case_io_getopt(d):
    """qemu-io's spellings: an attached -P value, "--" ending options, "1.1k"."""
    ours, ref = os.path.join(d, "g.qcow2"), os.path.join(d, "g-ref.qcow2")
    for p in (ours, ref):
        uqtest.qemu_create(p, MiB)
    cmds = ["write -P5 0 64k", "write -qP 0x21 -- 64k 4k", "write -zq -- 8k 4k",
            "read -P5 0 8k", "read -qP0 8k 4k",
            # qemu_strtosz: a fraction with a suffix, truncated (1126, 307)
            "write -P 0x42 1.1k 0.3k", "read -P 0x42 1126 307"]
    uqtest.qemu_io("qcow2", ref, cmds)
    args = []
    for c in cmds:
        args += ["-c", c]
    p = uqtest.uq("io", ours, *args, check=False)
    if p.returncode != 0:
        return f"io {cmds}: exit {p.returncode}: {p.stderr.strip()}"
    p = uqtest.qemu_img("compare", ref, ours, check=False)
    if p.returncode != 0:
        return f"differs from qemu-io's result: {(p.stdout + p.stderr).strip()}"
    for bad in ("read 1.5 1", "read 1.5b 1"):
        err = one_line_error(uqtest.uq("io", ours, "-c", bad, check=False), f"io -c '{bad}'",
                             ["bad argument"])
        if err:
            return err
    p = uqtest.uq("io", ours, "-c", "read -P6 0 512", check=False)
    if p.returncode == 0 or "Pattern verification failed" not in p.stdout:
        return f"read -P6 of 5s: exit {p.returncode}, stdout {p.stdout!r}"
    return None


# (create options, size, qemu-io commands): each request runs to the end of
# a disk whose last cluster is partial.
TAIL_CASES = [
    ({}, 102912, ["write -P 1 0 102912", "discard 65536 37376"]),
    ({}, 102912, ["write -P 1 0 102912", "discard 1000 101912"]),
    ({}, 102912, ["write -P 1 0 102912", "write -z 1000 101912"]),
    ({"cluster_size": 4096}, 102912, ["write -P 2 0 102912", "discard 1000 101912",
                                      "write -z -u 4097 8000"]),
    ({"cluster_size": 4096}, 102912, ["write -P 2 0 102912", "write -z 102400 512"]),
    ({"compat": "0.10"}, 102912, ["write -P 3 0 102912", "write -z 65536 37376",
                                  "discard 0 64k"]),
    ({"extended_l2": "on"}, 102912, ["write -P 4 0 102912", "discard 65536 37376"]),
    ({"extended_l2": "on"}, 102912, ["write -P 4 0 102912", "write -z 69632 33280"]),
    # Over a backing file (base.qcow2, all 9s): v3 hides it with zero flags,
    # v2 only with real zeros.
    ({"backing_file": "base.qcow2", "backing_fmt": "qcow2"}, 102912,
     ["write -P 5 0 4k", "write -z 65536 37376", "discard 4k 4k"]),
    ({"backing_file": "base.qcow2", "backing_fmt": "qcow2", "compat": "0.10"}, 102912,
     ["write -P 5 0 4k", "write -z 65536 37376", "write -z 70000 32912"]),
]


def pair(d, name, size, opts):
    """Two images by qemu-img with @opts, ours and qemu-io's, over a backing
    file of 9s where @opts name one."""
    ours, ref = os.path.join(d, name + ".qcow2"), os.path.join(d, name + "-ref.qcow2")
    if "backing_file" in opts:
        base = os.path.join(d, opts["backing_file"])
        uqtest.qemu_create(base, size)
        uqtest.qemu_io("qcow2", base, [f"write -P 9 0 {size}"])
    for p in (ours, ref):
        uqtest.qemu_create(p, size, **opts)
    return ours, ref


def case_tail(d, opts, size, cmds):
    ours, ref = pair(d, "t", size, opts)
    uqtest.qemu_io("qcow2", ref, cmds)
    args = []
    for c in cmds:
        args += ["-c", c]
    uqtest.uq("io", ours, *args)
    p = uqtest.qemu_img("compare", ref, ours, check=False)
    if p.returncode != 0:
        return f"differs from qemu-io's result: {(p.stdout + p.stderr).strip()}"
    # Discard leaves no data where qemu-io's leaves none (write -z may keep
    # an allocation qemu-io drops or the other way round: contents only).
    if any(c.startswith("discard") for c in cmds):
        m = [uqtest.qemu_img("map", "--output=json", f).stdout for f in (ref, ours)]
        strip = [[l.split('"offset"')[0] for l in x.splitlines()] for x in m]
        if strip[0] != strip[1]:
            return f"map differs:\nqemu-io: {m[0]}\nours:    {m[1]}"
    return uqtest.qemu_check_clean("after io", ours)


# write -z on whole clusters, as qemu-io: without -u an allocated cluster
# stays allocated (marked zero), with -u it goes; unallocated clusters are
# marked zero (v3); v2 has no zero flag. (OPTS, SETUP by qemu-io on both,
# SNAPSHOT after setup?, CMDS by each tool)
ZERO_CASES = [
    ({}, ["write -P 1 0 256k"], False,
     ["write -z 0 64k", "write -z -u 64k 64k", "write -z 512k 128k", "write -z 3M 64k"]),
    ({"compat": "0.10"}, ["write -P 1 0 256k"], False,
     ["write -z 0 64k", "write -z -u 64k 64k", "write -z 512k 128k"]),
    ({"extended_l2": "on"}, ["write -P 4 0 256k"], False,
     ["write -z 0 64k", "write -z -u 64k 64k", "write -z 512k 64k"]),
    ({}, ["write -c -P 5 0 128k", "write -P 6 128k 64k"], False,
     ["write -z 0 64k", "write -z -u 64k 128k"]),
    ({}, ["write -P 7 0 256k"], True,
     ["write -z 0 64k", "write -z -u 64k 64k", "write -P 8 128k 4k", "write -z 128k 64k"]),
    ({"backing_file": "zbase.qcow2", "backing_fmt": "qcow2"}, ["write -P 1 0 128k"], False,
     ["write -z 0 64k", "write -z 256k 64k", "write -z -u 64k 64k"]),
    # Partial clusters that read as zeros already widen to the cluster.
    ({}, ["write -P 1 128k 64k"], False,
     ["write -z 1000 4k", "write -z 130k 4k", "write -z 256k 64k", "write -z -u 257k 1k",
      "write -z 448k 64k", "write -z 449k 1k"]),
    ({}, ["write -P 2 0 128k"], False,
     ["write -z 0 64k", "write -z -u 1k 1k", "write -z 64k 64k", "write -z 65k 1k",
      "write -z 200k 70k"]),
    # Extended L2: whole subclusters get zero bits, part of one that reads as
    # zeros widens to it, the rest is written.
    ({"extended_l2": "on"}, ["write -P 4 0 256k"], False,
     ["write -z 128k 8k", "write -z 70000 10000", "write -z 200k 1k", "write -z 300k 3k",
      "write -z 400k 2k", "write -z 401k 1k", "write -z -u 2k 62k"]),
    ({"extended_l2": "on", "backing_file": "zbase.qcow2", "backing_fmt": "qcow2"},
     ["write -P 4 0 64k", "write -c -P 5 64k 64k"], False,
     ["write -z 2k 4k", "write -z 66k 2k", "write -z 200k 6k", "write -z 300k 1k"]),
    # Writes into fresh clusters: the rest of each is allocated in the file
    # too, as QEMU does (holes make qemu-img map report them as zeros).
    ({}, [], False, ["write -P 1 0 4k", "write -P 2 128k 4k", "write -P 3 300k 1k",
                     "write -P 4 1M 8k", "write -P 5 2M 100k"]),
    ({"extended_l2": "on"}, [], False, ["write -P 1 0 4k", "write -P 2 128k 4k",
                                        "write -P 3 1M 1k", "write -P 4 2M 100k"]),
    ({"cluster_size": 2 * MiB}, [], False, ["write -P 1 0 4k", "write -P 2 3M 64k"]),
]


def case_zero_map(d, opts, setup, snap, cmds):
    ours, ref = pair(d, "z", 4 * MiB, opts)
    for p in (ours, ref):
        if setup:
            uqtest.qemu_io("qcow2", p, setup)
        if snap:
            uqtest.qemu_img("snapshot", "-c", "s1", p)
    uqtest.qemu_io("qcow2", ref, cmds)
    uqtest.uq("io", ours, *[a for c in cmds for a in ("-c", c)])
    p = uqtest.qemu_img("compare", ref, ours, check=False)
    if p.returncode != 0:
        return f"differs from qemu-io's result: {(p.stdout + p.stderr).strip()}"
    maps = [json.loads(uqtest.qemu_img("map", "--output=json", f).stdout) for f in (ref, ours)]
    for m in maps:
        for e in m:
            e["offset"] = "offset" in e     # where, may differ; whether, may not
    if maps[0] != maps[1]:
        return f"map differs:\nqemu-io: {maps[0]}\nours:    {maps[1]}"
    return uqtest.qemu_check_clean("after io write -z", ours)


# io -f raw on files whose size is not a multiple of 512, as qemu-io: the
# image is whole sectors, so a write into the partial last one grows the
# file to where it ends (write -z to the end of its range, data to the end
# of its bytes), past the last sector fails; discard keeps the size.
RAW_TAIL_CASES = [
    (1000, ["write -P 5 512 488"]), (1000, ["write -P 5 900 124"]),
    (1000, ["write -P 5 1000 1", "write -P 6 1010 14", "read -P 0 1001 9"]),
    (1000, ["write -P 5 1023 2"]), (1000, ["write -P 5 1024 1"]),
    (1000, ["write -z 900 124"]), (1000, ["write -z 1000 1"]), (1000, ["write -z 0 1024"]),
    (1000, ["write -z 1000 25"]), (1000, ["discard 512 512"]),
    (1000, ["read -P 0 1000 24"]), (1000, ["read 1020 8"]),
    (100, ["write -z 0 512", "read -P 0 0 512"]),
]


def case_io_raw_tail(d, size, cmds):
    ours, ref = os.path.join(d, "rt.raw"), os.path.join(d, "rt-ref.raw")
    with open(ours, "wb") as f:
        f.write(os.urandom(size))
    shutil.copyfile(ours, ref)
    try:
        args = []
        for c in cmds:
            args += ["-c", c]
        p = uqtest.uq("io", "-f", "raw", *args, ours, check=False)
        q = uqtest.qemu_io("raw", ref, cmds, check=False)
        if p.returncode != q.returncode:
            return f"exit {p.returncode}, qemu-io {q.returncode}: {p.stdout!r} {p.stderr!r}"
        return uqtest.file_mismatch(ours, ref, "qemu-io")
    finally:
        for f in (ours, ref):
            os.unlink(f)


def case_bench_unaligned_direct():
    # O_DIRECT needs a disk file system (tmpfs may refuse it).
    d = uqtest.run(["mktemp", "-d", "/var/tmp/uq-contract-XXXXXX"]).stdout.strip()
    try:
        ours, ref = os.path.join(d, "b.qcow2"), os.path.join(d, "b-ref.qcow2")
        for p in (ours, ref):
            uqtest.qemu_create(p, 2 * MiB)
        for args in (["-w", "-c", "50", "-s", "1000", "-o", "100", "-t", "none",
                      "--pattern=9"],
                     ["-w", "-c", "40", "-s", "4k", "-S", "5000", "-t", "none",
                      "--pattern=17"]):
            p = uqtest.uq("bench", *args, ours, check=False)
            if p.returncode != 0 or "Run completed in" not in p.stdout:
                return f"bench {' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}"
            uqtest.qemu_img("bench", "-f", "qcow2", *args, ref)
        p = uqtest.uq("bench", "-c", "50", "-s", "1000", "-o", "100", "-t", "none", ours,
                      check=False)
        if p.returncode != 0:
            return f"bench read -s 1000 -t none: exit {p.returncode}: {p.stderr.strip()}"
        p = uqtest.qemu_img("compare", ref, ours, check=False)
        if p.returncode != 0:
            return f"differs from qemu-img bench's: {(p.stdout + p.stderr).strip()}"
        return uqtest.qemu_check_clean("after bench", ours)
    finally:
        uqtest.cleanup(d)


def case_bench_option_names(d):
    img = os.path.join(d, "o.qcow2")
    uqtest.qemu_create(img, MiB)
    for args, name in ((["-w", "--flush-interval=0"], "--flush-interval"),
                       (["-w", "--flush-interval=abc"], "--flush-interval"),
                       (["--pattern=256"], "--pattern"), (["-S", "-1"], "-S")):
        err = one_line_error(uqtest.uq("bench", *args, img, check=False),
                             f"bench {' '.join(args)}", [name])
        if err:
            return err
    return None


def case_bench_probe(d):
    """Without -f the format is probed, as qemu-img bench: a raw image reads."""
    img = os.path.join(d, "p.img")
    uqtest.qemu_img("create", "-q", "-f", "raw", img, "1M")
    p = uqtest.uq("bench", "-c", "100", img, check=False)
    if p.returncode != 0 or "Run completed in" not in p.stdout:
        return f"bench of a raw image: exit {p.returncode}: {p.stderr.strip()}"
    return None


def case_snapshot_raw(d):
    img = os.path.join(d, "r.img")
    uqtest.qemu_img("create", "-q", "-f", "raw", img, "1M")
    before = uqtest.sha256(img)
    q = uqtest.qemu_img("snapshot", "-l", img, check=False)
    p = uqtest.uq("snapshot", "-l", img, check=False)
    if (p.returncode, p.stdout) != (q.returncode, q.stdout) or p.stderr:
        return (f"snapshot -l raw: exit {p.returncode} {p.stdout!r} {p.stderr!r}, qemu-img "
                f"exit {q.returncode} {q.stdout!r}")
    for a in (["-c", "s"], ["-a", "s"], ["-d", "s"]):
        err = one_line_error(uqtest.uq("snapshot", *a, img, check=False),
                             f"snapshot {' '.join(a)} raw", ["r.img"])
        if err:
            return err
    if uqtest.sha256(img) != before:
        return "the raw image changed"
    return None


def case_snapshot_resized(d, size, new_size):
    """-a of a snapshot taken before a resize: qemu-img resizes the image back."""
    ours, ref = os.path.join(d, "sr.qcow2"), os.path.join(d, "sr-ref.qcow2")
    uqtest.qemu_create(ours, size)
    uqtest.qemu_io("qcow2", ours, [f"write -P 1 0 {size}"])
    uqtest.qemu_img("snapshot", "-c", "a", ours)
    uqtest.qemu_img("resize", "-q", "--shrink", ours, str(new_size))
    uqtest.qemu_io("qcow2", ours, ["write -P 3 0 64k", f"write -P 4 {new_size - 65536} 64k"])
    uqtest.run(["cp", ours, ref])
    uqtest.qemu_img("snapshot", "-a", "a", ref)
    p = uqtest.uq("snapshot", "-a", "a", ours, check=False)
    if p.returncode != 0:
        return f"snapshot -a: exit {p.returncode}: {p.stderr.strip()}"
    p = uqtest.qemu_img("compare", "-s", ref, ours, check=False)
    if p.returncode != 0:
        return f"differs from qemu-img's -a: {(p.stdout + p.stderr).strip()}"
    return uqtest.qemu_check_clean("after -a", ours)


def case_device_args(d):
    img = os.path.join(d, "g.qcow2")
    uqtest.qemu_create(img, MiB)
    uqtest.qemu_img("snapshot", "-c", "snap", img)
    orphan = os.path.join(d, "orphan.qcow2")
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2",
                    orphan, "1M")
    short = os.path.join(d, "short.qcow2")
    with open(short, "wb") as f:
        f.write(b"QFI\xfb")
    before = uqtest.sha256(img)
    cases = [
        (["list", "-n", "abc"], ["list:", "abc"]),
        (["del", "-n", "abc"], ["del:", "abc"]),
        (["recover", "-n", "x1"], ["recover:", "x1"]),
        (["add", "-n", "-1", img], ["add:", "-1"]),
        (["add", "-n", "1048576", img], ["add:", "1048576"]),
        (["add", "-q", "0", img], ["add:", "-q"]),
        (["add", "-d", "0", img], ["add:", "-d"]),
        (["add", "-d", "99999999", img], ["add:", "-d"]),
        (["add", "-f", "bad", img], ["add:", "bad"]),
        (["add", "--cache-size", "abc", img], ["add:", "abc"]),
        (["del"], ["del:"]),
        (["del", "-n", "0", "-a"], ["del:"]),
        (["del", "x"], ["del:"]),
        (["recover"], ["recover:"]),
        (["recover", "-n", "1", "x"], ["recover:"]),
        (["list", "x"], ["list:"]),
        (["list", "--output=xml"], ["list:"]),
        (["features", "x"], ["features:"]),
        (["add"], ["add:"]),
        (["add", img, "extra"], ["add:"]),
        (["add", "--snapshot", img], ["add:"]),
        (["add", os.path.join(d, "missing.qcow2")], ["missing.qcow2"]),
        (["add", "--snapshot", "nope", img], ["g.qcow2", "nope"]),
        (["add", "--read-only", "--snapshot", "nope", img], ["g.qcow2", "nope"]),
        (["add", orphan], ["orphan.qcow2", "gone.qcow2"]),
        (["add", "--overlay", orphan], ["orphan.qcow2", "gone.qcow2"]),
        (["add", short], ["short.qcow2"]),
        (["add", "--overlay", "--snapshot", "snap", img], ["g.qcow2"]),
    ]
    for args, must in cases:
        err = one_line_error(uqtest.uq(*args, check=False, timeout=60), " ".join(args), must)
        if err:
            return err
    if uqtest.sha256(img) != before:
        return "the image changed"
    return None


def case_version():
    p = uqtest.uq("--version")
    lines = p.stdout.splitlines()
    if len(lines) != 1 or not lines[0].startswith("ublk-qcow2 version "):
        return f"--version printed {p.stdout!r}"
    return None


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    res = uqtest.Results("test_contract_cmds")
    d = uqtest.scratch_dir("contract")
    try:
        res.case("io: LEN beyond the image refused before allocating", case_io_huge_len, d)
        res.case("io: -P5, -- and 1.1k as qemu-io takes them", case_io_getopt, d)
        for i, (opts, size, cmds) in enumerate(TAIL_CASES):
            res.case(f"io to the end of a partial last cluster {i}: {opts} {cmds[1:]}",
                     case_tail, d, opts, size, cmds)
        for i, (opts, setup, snap, cmds) in enumerate(ZERO_CASES):
            res.case(f"io as qemu-io, qemu-img map the same {i}: {opts} {cmds}",
                     case_zero_map, d, opts, setup, snap, cmds)
        # The same on a disk file system (tmpfs and ext4 allocate differently).
        disk = uqtest.run(["mktemp", "-d", "/var/tmp/uq-contract-XXXXXX"]).stdout.strip()
        try:
            for i, (opts, setup, snap, cmds) in enumerate(ZERO_CASES[-3:]):
                res.case(f"io as qemu-io on /var/tmp, qemu-img map the same {i}: {opts}",
                         case_zero_map, disk, opts, setup, snap, cmds)
            for size, cmds in RAW_TAIL_CASES:
                for where in (d, disk):
                    res.case(f"io -f raw as qemu-io, {size}-byte file, in {where}: {cmds}",
                             case_io_raw_tail, where, size, cmds)
        finally:
            uqtest.cleanup(disk)
        res.case("bench -t none, unaligned SIZE/OFFSET/STEP (as qemu-img bench)",
                 case_bench_unaligned_direct)
        res.case("bench: errors name the long option", case_bench_option_names, d)
        res.case("bench probes the format (a raw image without -f)", case_bench_probe, d)
        res.case("snapshot on a raw image (-l as qemu-img)", case_snapshot_raw, d)
        res.case("snapshot -a of a smaller snapshot (grown since)", case_snapshot_resized, d,
                 4 * MiB, 8 * MiB)
        res.case("snapshot -a of a larger snapshot (shrunk since)", case_snapshot_resized, d,
                 8 * MiB, 4 * MiB)
        res.case("--version", case_version)
        res.case("add/del/list/recover: bad arguments, one line, before the driver",
                 case_device_args, d)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
