#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Extended L2 entries (subclusters) made by qemu-img/qemu-io read back
through our engine exactly as qemu-img reads them: `convert -O raw` equal
byte for byte and `map --output=json` equal to qemu-img's, for several
cluster sizes, with subcluster-sized writes, zeroes and discards, over a
backing file (extended or not, so unallocated subclusters show it) and
with compressed clusters. Writes through `io` (subcluster-sized and
smaller, zeroes) agree with qemu-io on a raw mirror over a backing file
(where a small write allocates only the subclusters it touches), into
compressed clusters and into clusters shared with a snapshot (which keeps
its data); `qemu-img check` is clean after each. `create -o
extended_l2=on,preallocation=...` makes qemu-img's image.
"""

import json
import os
import random
import sys

import uqtest

MiB = 1 << 20


def fill(c, v, seed):
    """qemu-io commands: subcluster-sized and unaligned pieces, zeroes, discards."""
    rnd = random.Random(seed)
    sc = c // 32
    cmds = [f"write -P 0x11 0 {3 * c + sc // 2}",
            f"write -z {c + sc} {2 * sc}",
            f"discard {2 * c} {c}"]
    for _ in range(60):
        off = rnd.randrange(0, v - 4 * c) // 512 * 512
        kind = rnd.randrange(6)
        if kind < 3:
            cmds.append(f"write -P {rnd.randrange(1, 255):#x} {off} {rnd.choice([512, sc, sc + 1536, 3 * sc, c + sc])}")
        elif kind < 5:
            cmds.append(f"write -z {off} {rnd.choice([sc, 2 * sc, c])}")
        else:
            cmds.append(f"discard {off // c * c} {c}")
    return cmds


def compare(img, d, fmt_args=()):
    ref = os.path.join(d, "ref.raw")
    ours = os.path.join(d, "ours.raw")
    try:
        uqtest.qemu_img("convert", "-O", "raw", img, ref)
        uqtest.uq("convert", "-O", "raw", img, ours)
        diff = uqtest.first_difference(ref, ours)
        if diff:
            return f"convert -O raw differs from qemu-img's: {diff}"
    finally:
        for p in (ref, ours):
            if os.path.exists(p):
                os.unlink(p)
    q = json.loads(uqtest.qemu_img("map", "--output=json", img).stdout)
    u = json.loads(uqtest.uq("map", "--output=json", img).stdout)
    keys = ("start", "length", "depth", "zero", "data", "offset")
    qs = [{k: e.get(k) for k in keys} for e in q]
    us = [{k: e.get(k) for k in keys} for e in u]
    if qs != us:
        for a, b in zip(qs, us):
            if a != b:
                return f"map differs: qemu-img {a} vs ours {b}"
        return f"map differs in length: {len(qs)} vs {len(us)} extents"
    return None


def case_plain(d, c):
    v = 16 * MiB
    img = os.path.join(d, f"x{c}.qcow2")
    uqtest.qemu_create(img, v, cluster_size=c, extended_l2="on")
    uqtest.qemu_io("qcow2", img, fill(c, v, c))
    return compare(img, d)


def case_backing(d, c, base_ext):
    v = 16 * MiB
    base = os.path.join(d, f"b{c}.qcow2")
    top = os.path.join(d, f"t{c}.qcow2")
    uqtest.qemu_create(base, v, cluster_size=65536, extended_l2=base_ext)
    uqtest.qemu_io("qcow2", base, [f"write -P 0x5a 0 {v}"])
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                    "-o", f"cluster_size={c},extended_l2=on", top, str(v))
    uqtest.qemu_io("qcow2", top, fill(c, v, c + 1))
    return compare(top, d)


def case_compressed(d, c):
    v = 8 * MiB
    raw = os.path.join(d, "src.raw")
    img = os.path.join(d, f"z{c}.qcow2")
    with open(raw, "wb") as f:
        f.truncate(v)
    uqtest.qemu_io("raw", raw, [f"write -P 0x33 0 {v // 2}", f"write -P 0x44 {v - c} {c}"])
    uqtest.qemu_img("convert", "-c", "-O", "qcow2", "-o", f"cluster_size={c},extended_l2=on",
                    raw, img)
    os.unlink(raw)
    uqtest.qemu_io("qcow2", img, [f"write -P 0x77 {c // 2} 4096", f"write -z {3 * c} {c // 32}"])
    return compare(img, d)


def random_writes(img, mirror, seed, n=400, size=16 * MiB):
    """@n seeded writes/zeroes (512-byte granular, often sub-subcluster)
    through `ublk-qcow2 io` on @img and qemu-io on the raw @mirror."""
    rnd = random.Random(seed)
    ours, theirs = [], []
    for _ in range(n):
        length = rnd.choice([512, 1024, 1536, 4096, 6144, 65536, 200704])
        off = rnd.randrange(0, (min(size, 4 * MiB) - length) // 512) * 512
        if rnd.random() < 0.8:
            c = f"write -P {rnd.randrange(1, 255):#x} {off} {length}"
        else:
            c = f"write -z {off} {length}"
        ours.append(c)
        theirs.append(c)
    cmdfile = img + ".ops"
    with open(cmdfile, "w") as f:
        f.write("".join(c + "\n" for c in ours))
    uqtest.uq("io", img, "-C", cmdfile)
    os.unlink(cmdfile)
    for i in range(0, len(theirs), 200):
        uqtest.qemu_io("raw", mirror, theirs[i:i + 200])


def same_as_mirror(img, mirror):
    p = uqtest.qemu_img("compare", "-f", "qcow2", "-F", "raw", img, mirror, check=False)
    if p.returncode != 0:
        return f"qemu-img compare with the mirror: {(p.stdout + p.stderr).strip()}"
    p = uqtest.qemu_img("check", img, check=False)
    if p.returncode != 0:
        return f"qemu-img check exits {p.returncode}:\n{uqtest.tail(p.stdout + p.stderr, 8)}"
    return None


def case_write_backing(d, c):
    """Writes over a backing file copy only the touched subclusters."""
    v = 16 * MiB
    base = os.path.join(d, "wb.qcow2")
    top = os.path.join(d, "wt.qcow2")
    mirror = os.path.join(d, "wm.raw")
    uqtest.qemu_create(base, v)
    uqtest.qemu_io("qcow2", base, [f"write -P 0x5a 0 {v}"])
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                    "-o", f"cluster_size={c},extended_l2=on", top, str(v))
    sc = c // 32
    # One write inside subcluster 4 of cluster 1: only that subcluster is allocated.
    inside = sc // 2 if sc >= 1024 else 0
    uqtest.uq("io", top, "-c", f"write -P 0x11 {c + 4 * sc + inside} 512")
    m = json.loads(uqtest.qemu_img("map", "--output=json", top).stdout)
    own = [(e["start"], e["length"]) for e in m if e["depth"] == 0 and e["data"]]
    if own != [(c + 4 * sc, sc)]:
        return f"a 512-byte write allocated {own}, expected one subcluster [{c + 4 * sc}, +{sc})"
    uqtest.qemu_img("convert", "-O", "raw", top, mirror)
    random_writes(top, mirror, c)
    return same_as_mirror(top, mirror)


def case_write_plain(d, c, compressed):
    v = 16 * MiB
    img = os.path.join(d, "p.qcow2")
    mirror = os.path.join(d, "pm.raw")
    with open(mirror, "wb") as f:
        f.truncate(v)
    uqtest.qemu_io("raw", mirror, fill(c, v, 7))
    o = f"cluster_size={c},extended_l2=on"
    if compressed:
        uqtest.qemu_img("convert", "-c", "-O", "qcow2", "-o", o, mirror, img)
    else:
        uqtest.qemu_create(img, v, cluster_size=c, extended_l2="on")
        uqtest.qemu_io("qcow2", img, fill(c, v, 7))
    random_writes(img, mirror, c + 3)
    return same_as_mirror(img, mirror)


def case_write_snapshot(d, c, backing=False):
    """Clusters shared with a snapshot are copied; the snapshot keeps its data.
    Over a backing file, the parts of partly written subclusters the shared
    cluster lacked come from the backing file."""
    v = 16 * MiB
    img = os.path.join(d, "s.qcow2")
    mirror = os.path.join(d, "sm.raw")
    snap = os.path.join(d, "snap.raw")
    if backing:
        base = os.path.join(d, "sb.qcow2")
        uqtest.qemu_create(base, v)
        uqtest.qemu_io("qcow2", base, [f"write -P 0x5a 0 {v}"])
        uqtest.qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                        "-o", f"cluster_size={c},extended_l2=on", img, str(v))
        sc = c // 32
        # Clusters with a few subclusters of their own, the rest from the base.
        uqtest.qemu_io("qcow2", img, [f"write -P 0x21 {k * c + 3 * sc} {sc}" for k in range(40)])
    else:
        uqtest.qemu_create(img, v, cluster_size=c, extended_l2="on")
    uqtest.qemu_io("qcow2", img, fill(c, v, 11) if not backing else [])
    uqtest.qemu_img("snapshot", "-c", "s1", img)
    uqtest.qemu_img("convert", "-O", "raw", img, mirror)
    uqtest.qemu_img("convert", "-O", "raw", img, snap)
    random_writes(img, mirror, c + 5)
    err = same_as_mirror(img, mirror)
    if err:
        return err
    after = os.path.join(d, "after.raw")
    uqtest.qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", img, after)
    return uqtest.first_difference(snap, after)


def case_prealloc(d, c, mode, size):
    """create -o extended_l2=on,preallocation=MODE: qemu-img's image byte for
    byte where one L2 table and one refcount block cover it (the limit of
    our preallocated layouts with standard L2 entries too), else the same
    disk and map; then writes agree with qemu-io on a raw mirror."""
    ours, ref = os.path.join(d, "pa-ours.qcow2"), os.path.join(d, "pa-ref.qcow2")
    o = f"extended_l2=on,cluster_size={c},preallocation={mode}"
    uqtest.uq("create", "-f", "qcow2", "-o", o, ours, str(size))
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", o, ref, str(size))
    if mode == "metadata" and size <= c * (c // 16):
        diff = uqtest.first_difference(ours, ref)
        if diff:
            return f"-o {o} {size}: our image differs from qemu-img's: {diff}"
    p = uqtest.qemu_img("check", ours, check=False)
    if p.returncode != 0:
        return f"qemu-img check exits {p.returncode}:\n{uqtest.tail(p.stdout + p.stderr, 8)}"
    uqtest.qemu_img("compare", ours, ref)
    maps = []
    for x in (ours, ref):
        # Host offsets differ where the layouts do: compare the guest view.
        m = []
        for e in json.loads(uqtest.qemu_img("map", "--output=json", x).stdout):
            e = {k: v for k, v in e.items() if k not in ("offset", "start", "length")}
            if not m or m[-1] != e:
                m.append(e)
        maps.append(m)
    if maps[0] != maps[1]:
        return f"qemu-img map differs:\n{maps[0]}\n{maps[1]}"
    mirror = os.path.join(d, "pa.mirror")
    with open(mirror, "wb") as f:
        f.truncate(size)
    random_writes(ours, mirror, seed=c + size, n=200, size=size)
    return same_as_mirror(ours, mirror)


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    res = uqtest.Results("test_extl2")
    d = uqtest.scratch_dir("extl2")
    try:
        for c in (16384, 65536, 2 * MiB):
            res.case(f"plain cluster_size={c}", case_plain, d, c)
            res.case(f"compressed cluster_size={c}", case_compressed, d, c)
        for mode in ("metadata", "falloc", "full"):
            for c, size in ((16384, 4 * MiB), (65536, 10 * MiB), (2 * MiB, 10 * MiB),
                            (16384, 300 * MiB + 512)):
                res.case(f"create preallocation={mode} cluster_size={c} size={size}",
                         case_prealloc, d, c, mode, size)
        for c in (16384, 65536):
            for base_ext in ("on", "off"):
                res.case(f"backing cluster_size={c} base extended_l2={base_ext}",
                         case_backing, d, c, base_ext)
        for c in (16384, 65536):
            res.case(f"writes over a backing file cluster_size={c}", case_write_backing, d, c)
            res.case(f"writes cluster_size={c}", case_write_plain, d, c, False)
            res.case(f"writes into compressed clusters cluster_size={c}", case_write_plain,
                     d, c, True)
            res.case(f"writes into snapshot-shared clusters cluster_size={c}",
                     case_write_snapshot, d, c)
            res.case(f"writes into snapshot-shared clusters over a backing file "
                     f"cluster_size={c}", case_write_snapshot, d, c, True)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
