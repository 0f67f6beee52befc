#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Extended L2 entries (subclusters) made by qemu-img/qemu-io read back
through our engine exactly as qemu-img reads them: `convert -O raw` equal
byte for byte and `map --output=json` equal to qemu-img's, for several
cluster sizes, with subcluster-sized writes, zeroes and discards, over a
backing file (extended or not, so unallocated subclusters show it) and
with compressed clusters. Writing is not supported yet: a read-write open
must fail with one clear line and leave the image as it was.
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


def case_write_refused(d):
    img = os.path.join(d, "w.qcow2")
    uqtest.qemu_create(img, 4 * MiB, cluster_size=65536, extended_l2="on")
    uqtest.qemu_io("qcow2", img, ["write -P 0x11 0 1M"])
    before = uqtest.sha256(img)
    p = uqtest.uq("io", img, "-c", "write -P 0x22 0 4k", check=False)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    if p.returncode == 0:
        return "a write to an extended L2 image succeeded"
    if len(lines) != 1 or img not in lines[0] or "extended L2" not in lines[0]:
        return f"expected one error line naming the file and the feature, got {p.stderr!r}"
    if uqtest.sha256(img) != before:
        return "the refused write changed the image"
    return None


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    res = uqtest.Results("test_extl2")
    d = uqtest.scratch_dir("extl2")
    try:
        for c in (16384, 65536, 2 * MiB):
            res.case(f"plain cluster_size={c}", case_plain, d, c)
            res.case(f"compressed cluster_size={c}", case_compressed, d, c)
        for c in (16384, 65536):
            for base_ext in ("on", "off"):
                res.case(f"backing cluster_size={c} base extended_l2={base_ext}",
                         case_backing, d, c, base_ext)
        res.case("writes refused, image untouched", case_write_refused, d)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
