#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Metadata overlap checks (src/qcow2/overlap.c): hand-crafted images whose
L1 or L2 entries point a guest cluster at metadata (the L1 table, an L2
table, the refcount table, a refcount block, the snapshot table, a
snapshot's L1 table), or whose refcounts call a metadata cluster free so
that an allocation picks it, written through `ublk-qcow2 io`. Each write must:
  - fail (exit 1) with exactly one stderr line that names the file and the
    metadata it would have overwritten;
  - leave every byte of the file as it was, except the corrupt bit
    (incompatible bit 1), which must now be set; the file may grow by
    clusters allocated before the refusal (leaks, as a crash would leave);
  - leave an image that qemu-img info shows as corrupt: true, that a
    read-write open then refuses, and that still reads (`io -r`).
The untouched source image takes the same write first, which must succeed,
or the refusals would prove nothing.
"""

import json
import os
import shutil
import struct
import sys

import uqtest
import qcow2img

CORRUPT_BIT = 1 << 1
WRITE = "write -P 0x11 0 4k"


def make_source(path, snapshot):
    qcow2img.make_source(path)
    if snapshot:
        uqtest.qemu_img("snapshot", "-c", "s1", path)


def snapshot_l1(img):
    """Host offset of the first snapshot's L1 table."""
    return img.u64(img.h["snapshots_offset"])


# name -> (needs a snapshot, poke(img), words the error must contain[, write])
CASES = {
    # Refcounts that lie: the allocator hands out metadata clusters, which
    # only the overlap check (it trusts no refcount) stops.
    "refcount of the L1 table 0: allocation lands on it": (
        False, lambda img: img.set_refcount(img.h["l1_table_offset"], 0),
        "active L1 table", "write -P 0x11 1M 4k"),
    "refcount of the refcount table 0: allocation lands on it": (
        False, lambda img: img.set_refcount(img.h["refcount_table_offset"], 0),
        "refcount table", "write -P 0x11 1M 4k"),
    "L2 entry -> L1 table": (
        False, lambda img: img.set_u64(img.l2_entry_off(0),
                                       img.h["l1_table_offset"] | qcow2img.COPIED),
        "active L1 table"),
    "L2 entry -> its own L2 table": (
        False, lambda img: img.set_u64(img.l2_entry_off(0),
                                       (img.l1()[0] & qcow2img.OFFSET_MASK) | qcow2img.COPIED),
        "active L2 table"),
    "L2 entry -> refcount table": (
        False, lambda img: img.set_u64(img.l2_entry_off(0),
                                       img.h["refcount_table_offset"] | qcow2img.COPIED),
        "refcount table"),
    "L2 entry -> refcount block": (
        False, lambda img: img.set_u64(img.l2_entry_off(0),
                                       img.u64(img.h["refcount_table_offset"]) | qcow2img.COPIED),
        "refcount block"),
    # The refcount table read as an L2 table: its first entry (a refcount
    # block) becomes guest cluster 0's data cluster.
    "L1 entry -> refcount table as L2 table": (
        False, lambda img: img.set_u64(img.l1_entry_off(0),
                                       img.h["refcount_table_offset"] | qcow2img.COPIED),
        "refcount block"),
    "L2 entry -> snapshot table": (
        True, lambda img: img.set_u64(img.l2_entry_off(0),
                                      img.h["snapshots_offset"] | qcow2img.COPIED),
        "snapshot table"),
    "L2 entry -> snapshot L1 table": (
        True, lambda img: img.set_u64(img.l2_entry_off(0), snapshot_l1(img) | qcow2img.COPIED),
        "inactive L1 table"),
}


def unchanged_but_corrupt_bit(before, path):
    """None if @path holds @before (plus appended bytes) with only the
    corrupt bit added, else what differs."""
    with open(path, "rb") as f:
        after = f.read()
    if len(after) < len(before):
        return f"the file shrank from {len(before)} to {len(after)} bytes"
    old = int.from_bytes(before[72:80], "big")
    new = int.from_bytes(after[72:80], "big")
    if new != old | CORRUPT_BIT:
        return f"incompatible features {new:#x}, expected {old | CORRUPT_BIT:#x}"
    for lo, hi in ((0, 72), (80, len(before))):
        if after[lo:hi] != before[lo:hi]:
            i = next(k for k in range(lo, hi) if after[k] != before[k])
            return f"byte {i:#x} of the original file changed ({before[i]:#04x} -> {after[i]:#04x})"
    return None


def one_case(d, name, snapshot, poke, words, write=WRITE):
    src = os.path.join(d, "src.qcow2")
    img = os.path.join(d, "bad.qcow2")
    make_source(src, snapshot)
    good = os.path.join(d, "good.qcow2")
    shutil.copyfile(src, good)
    p = uqtest.uq("io", good, "-c", write, check=False, timeout=60)
    if p.returncode != 0:
        return f"the write fails on the valid image: {p.stderr.strip()}"
    shutil.copyfile(src, img)
    poke(qcow2img.Image(img))
    with open(img, "rb") as f:
        before = f.read()

    p = uqtest.uq("io", img, "-c", write, check=False, timeout=60)
    if p.returncode < 0 or "Sanitizer" in p.stderr or "runtime error" in p.stderr:
        return f"crashed (exit {p.returncode}):\n{uqtest.tail(p.stderr, 12)}"
    if p.returncode != 1:
        return f"exit {p.returncode}, expected 1 (stderr: {p.stderr.strip()!r})"
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    if len(lines) != 1:
        return f"expected one stderr line, got {len(lines)}:\n{uqtest.tail(p.stderr, 8)}"
    if img not in lines[0] or words not in lines[0]:
        return f"the error does not name the file and the {words}: {lines[0]!r}"
    err = unchanged_but_corrupt_bit(before, img)
    if err:
        return err
    info = json.loads(uqtest.qemu_img("info", "--output=json", img).stdout)
    if info.get("format-specific", {}).get("data", {}).get("corrupt") is not True:
        return "qemu-img info does not show corrupt: true"
    p = uqtest.uq("io", img, "-c", "read 64k 4k", check=False, timeout=60)
    if p.returncode == 0 or "corrupt" not in p.stderr:
        return f"a read-write open of the marked image: exit {p.returncode}, {p.stderr.strip()!r}"
    p = uqtest.uq("io", "-r", img, "-c", "read 64k 4k", check=False, timeout=60)
    if p.returncode != 0:
        return f"a read-only open of the marked image fails: {p.stderr.strip()!r}"
    return None


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    res = uqtest.Results("test_overlap")
    d = uqtest.scratch_dir("overlap")
    try:
        for name, case in CASES.items():
            res.case(name, one_case, d, name, *case)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
