#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Seeded random operation sequences applied by `ublk-qcow2 io` to a qcow2
image and by `qemu-io -f raw` to a raw mirror must leave the two equal
(`qemu-img compare`, and our own `convert -O raw` against the mirror), and
`qemu-img check` must find no errors and no leaks after every batch.

Ops (one `io -C FILE` per batch): pattern writes of random sizes and offsets (512-byte granular, often
overlapping in a hot region, some megabytes long), write-zeroes, discards,
flushes, and pattern reads of ranges just written.  Discards are
cluster-aligned: qcow2 ignores partial-cluster discards, so a raw mirror
(where a discard becomes `write -z`) would differ.

  UQ_SEED=N       base seed (default 1); UQ_SEED=random picks one
  UQ_OPS=N        ops per image (default 3000, in 3 `io` invocations)
  UQ_KEEP=1       keep the scratch directory: ops-N.txt hold each batch
"""

import os
import random
import sys

import uqtest

KiB, MiB = 1 << 10, 1 << 20
SIZE = 64 * MiB
BATCHES = 3

# (name, made by, options)
CONFIGS = [
    ("qemu c512 rb1 v3", "qemu", dict(cluster_size=512, refcount_bits=1, compat="1.1")),
    ("qemu c512 rb64 v3", "qemu", dict(cluster_size=512, refcount_bits=64, compat="1.1")),
    ("qemu c4k rb64 v3", "qemu", dict(cluster_size=4096, refcount_bits=64, compat="1.1")),
    ("qemu c64k rb16 v2", "qemu", dict(cluster_size=65536, refcount_bits=16, compat="0.10")),
    ("qemu c64k rb8 v3 prealloc=metadata", "qemu",
     dict(cluster_size=65536, refcount_bits=8, compat="1.1", preallocation="metadata")),
    ("qemu c2M rb16 v3", "qemu", dict(cluster_size=2 << 20, refcount_bits=16, compat="1.1")),
    ("qemu c64k extl2", "qemu", dict(cluster_size=65536, extended_l2="on")),
    ("qemu c16k extl2 rb1", "qemu", dict(cluster_size=16384, extended_l2="on", refcount_bits=1)),
    ("ours default", "ours", {}),
    ("ours c4k rb1", "ours", dict(cluster_size=4096, refcount_bits=1)),
    ("ours c512 v2", "ours", dict(cluster_size=512, compat="0.10")),
    ("ours c512 rb64 v3", "ours", dict(cluster_size=512, refcount_bits=64)),
]


def rand_len(rng):
    r = rng.random()
    if r < 0.70:
        return rng.randint(1, 16) * 512
    if r < 0.92:
        return rng.randint(1, 512) * 512
    return rng.randint(1, 8192) * 512		# up to 4 MiB


def rand_off(rng, length):
    if rng.random() < 0.5:
        limit = 4 * MiB			# hot region: lots of overlap
    else:
        limit = SIZE
    limit = max(limit - length, 0)
    return rng.randint(0, limit // 512) * 512


def gen_ops(rng, n, cluster):
    """[(ours, mirror or None)] command pairs."""
    ops = []
    while len(ops) < n:
        r = rng.random()
        if r < 0.55:
            length = rand_len(rng)
            off = rand_off(rng, length)
            pat = rng.randint(0, 255)
            cmd = f"write -P {pat:#x} {off} {length}"
            ops.append((cmd, cmd))
        elif r < 0.72:
            length = rand_len(rng)
            off = rand_off(rng, length)
            pat = 0
            cmd = f"write -z {off} {length}"
            ops.append((cmd, cmd))
        elif r < 0.88:
            nr = rng.randint(1, max(1, min(64, (4 * MiB) // cluster)))
            off = rng.randint(0, SIZE // cluster - nr) * cluster
            length = nr * cluster
            pat = 0
            ops.append((f"discard {off} {length}", f"write -z {off} {length}"))
        else:
            ops.append(("flush", None))
            continue
        if rng.random() < 0.3:		# read back part of what was just done
            sub_off = off + rng.randint(0, length // 512 - 1) * 512
            sub_len = rng.randint(1, (off + length - sub_off) // 512) * 512
            ops.append((f"read -P {pat:#x} {sub_off} {sub_len}", None))
    return ops


def one_config(d, idx, made_by, opts, seed, nr_ops):
    img = os.path.join(d, f"img{idx}.qcow2")
    mirror = os.path.join(d, f"mirror{idx}.raw")
    ours_raw = os.path.join(d, f"ours{idx}.raw")
    rng = random.Random(seed)
    if made_by == "qemu":
        uqtest.qemu_create(img, SIZE, **opts)
    else:
        args = ["create", "-f", "qcow2"]
        if opts:
            args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
        uqtest.uq(*args, img, str(SIZE))
        err = uqtest.qemu_check_clean("after ublk-qcow2 create", img)
        if err:
            return err
    cluster = opts.get("cluster_size", 65536)
    uqtest.qemu_img("create", "-q", "-f", "raw", mirror, str(SIZE))

    ops = gen_ops(rng, nr_ops, cluster)
    per = (len(ops) + BATCHES - 1) // BATCHES
    for b in range(BATCHES):
        batch = ops[b * per:(b + 1) * per]
        cmdfile = os.path.join(d, f"ops{idx}-{b}.txt")
        with open(cmdfile, "w") as f:
            f.write("".join(o + "\n" for o, _ in batch))
        p = uqtest.uq("io", img, "-C", cmdfile, check=False)
        if p.returncode != 0:
            return (f"batch {b}: ublk-qcow2 io exited {p.returncode} "
                    f"(commands in ops{idx}-{b}.txt)\n{uqtest.tail(p.stderr, 10)}")
        mirror_cmds = [m for _, m in batch if m]
        for i in range(0, len(mirror_cmds), 500):
            uqtest.qemu_io("raw", mirror, mirror_cmds[i:i + 500])
        err = uqtest.qemu_check_clean(f"after batch {b}", img)
        if err:
            return err

    p = uqtest.qemu_img("compare", "-f", "qcow2", "-F", "raw", img, mirror, check=False)
    if p.returncode != 0:
        return f"qemu-img compare with the raw mirror: {(p.stdout + p.stderr).strip()}"
    uqtest.uq("convert", "-O", "raw", img, ours_raw)
    diff = uqtest.first_difference(mirror, ours_raw)
    if diff:
        return f"ublk-qcow2 convert -O raw differs from the raw mirror: {diff}"
    p = uqtest.uq("check", img, check=False)
    if p.returncode != 0:
        return f"ublk-qcow2 check exited {p.returncode}: {p.stdout.strip()} {p.stderr.strip()}"
    for f in (img, mirror, ours_raw):
        if os.environ.get("UQ_KEEP") != "1":
            os.unlink(f)
    return None


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    nr_ops = int(os.environ.get("UQ_OPS", "3000"))
    base = uqtest.base_seed(f"UQ_OPS={nr_ops}")
    res = uqtest.Results("test_random_io")
    d = uqtest.scratch_dir("randio")
    try:
        for idx, (name, made_by, opts) in enumerate(CONFIGS):
            seed = base * 1000 + idx
            res.case(f"{name} (seed {seed})", one_config, d, idx, made_by, opts, seed, nr_ops)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
