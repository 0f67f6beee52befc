#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Images made and filled by qemu-img/qemu-io read back identically through
our engine: for every cluster size x refcount width x compat level x
preallocation mode, `ublk-qcow2 convert -O raw` must produce exactly the
bytes of `qemu-img convert -O raw`.

The fill mixes pattern writes, write-zeroes (with and without unmap),
discards, writes straddling cluster and L2-table boundaries and a write that
ends at the last byte of the disk.  The virtual size is 64 MiB, or one L2
span plus 8 MiB where an L2 table covers 64 MiB or more (so some write
crosses an L2 boundary); with 2 MiB clusters one L2 table covers 512 GiB and
no boundary can be crossed at a sane size -- said as a note, not hidden.

With preallocation=off the reference raw image also goes the other way:
`ublk-qcow2 convert -f raw -O qcow2` with the case's cluster size, refcount
width and compat level must give an image that qemu-img compare finds equal
to the raw one and qemu-img check finds clean.

UQ_MATRIX_FILTER=SUBSTRING runs only the cases whose name contains it.
"""

import os
import sys

import uqtest

CLUSTER_SIZES = [512, 4096, 65536, 2 << 20]
REFCOUNT_BITS = [1, 16, 64]
COMPAT = ["0.10", "1.1"]
PREALLOC = ["off", "metadata", "falloc"]
MiB = 1 << 20


def virtual_size(c):
    l2_span = c * (c // 8)
    if l2_span < 64 * MiB:
        return 64 * MiB
    if l2_span <= 512 * MiB:
        return l2_span + 8 * MiB
    return 64 * MiB


def fill_commands(c, v):
    """A deterministic mix of qemu-io commands for cluster size @c and
    virtual size @v; every range lies inside the disk."""
    s = c * (c // 8)		# bytes one L2 table maps
    cmds = [
        f"write -P 0x11 0 {3 * c + 512}",		# partial last cluster
        f"write -P 0x22 {5 * c - 512} 1024",		# straddles a cluster boundary
        f"write -P 0x44 {8 * c} {4 * c}",
        f"discard {9 * c} {2 * c}",			# cluster-aligned discard
        f"write -P 0x55 {15 * c} {4 * c}",
        f"write -z -u {16 * c} {2 * c}",		# zeroes, unmap allowed
        f"write -z {18 * c - 1024} 2048",		# zeroes, unaligned to clusters
        f"write -P 0x66 {v - c - 512} {c + 512}",	# ends at the last byte
        f"write -P 0x77 {v // 2 + 1536} 4608",
        f"write -P 0x88 {v // 4 - 4096} {3 * MiB}",	# many clusters, crosses 2 MiB
        f"discard {v // 4 + 512} 4096",		# partial-cluster discard
        f"write -P 0x99 {v // 4 + 2 * MiB} 512",	# one sector into written area
    ]
    if s + 4 * c <= v:
        cmds += [
            f"write -P 0x33 {s - 2 * c} {4 * c}",	# crosses an L2 boundary
            f"write -z {s - c} {2 * c}",		# zeroes across it
        ]
    if 2 * s + 512 <= v:
        cmds.append(f"write -P 0x3c {2 * s - 512} 1024")	# the next one
    return cmds


def one_case(dirpath, c, rb, compat, prealloc):
    v = virtual_size(c)
    img = os.path.join(dirpath, "img.qcow2")
    ours = os.path.join(dirpath, "ours.raw")
    ref = os.path.join(dirpath, "ref.raw")
    back = os.path.join(dirpath, "back.qcow2")
    try:
        uqtest.qemu_create(img, v, cluster_size=c, refcount_bits=rb,
                           compat=compat, preallocation=prealloc)
        uqtest.qemu_io("qcow2", img, fill_commands(c, v), extra=["-d", "unmap"])
        uqtest.qemu_img("convert", "-f", "qcow2", "-O", "raw", img, ref)
        before = uqtest.sha256(img) if os.path.getsize(img) <= 128 * MiB else None
        uqtest.uq("convert", "-O", "raw", img, ours)
        diff = uqtest.first_difference(ref, ours)
        if diff:
            return f"ublk-qcow2 convert -O raw differs from qemu-img's: {diff}"
        if before and uqtest.sha256(img) != before:
            return "ublk-qcow2 convert changed its source image"
        if prealloc == "off":
            uqtest.uq("convert", "-f", "raw", "-O", "qcow2", "-o",
                      f"cluster_size={c},refcount_bits={rb},compat={compat}", ref, back)
            p = uqtest.qemu_img("compare", "-f", "raw", "-F", "qcow2", ref, back, check=False)
            if p.returncode != 0:
                return f"raw -> qcow2: qemu-img compare: {(p.stdout + p.stderr).strip()}"
            p = uqtest.qemu_img("check", back, check=False)
            if p.returncode != 0:
                return f"raw -> qcow2: qemu-img check exits {p.returncode}:\n{uqtest.tail(p.stdout + p.stderr, 8)}"
        return None
    finally:
        for p in (img, ours, ref, back):
            if os.path.exists(p):
                os.unlink(p)


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    flt = os.environ.get("UQ_MATRIX_FILTER", "")
    res = uqtest.Results("test_convert_matrix")
    d = uqtest.scratch_dir("convert")
    notes = set()
    try:
        for c in CLUSTER_SIZES:
            if c * (c // 8) + 4 * c > virtual_size(c):
                notes.add(f"cluster_size={c}: one L2 table maps {c * (c // 8) >> 30} GiB; "
                          f"no write crosses an L2 boundary at {virtual_size(c) >> 20} MiB")
            for rb in REFCOUNT_BITS:
                for compat in COMPAT:
                    for pre in PREALLOC:
                        name = f"cluster_size={c},refcount_bits={rb},compat={compat},preallocation={pre}"
                        if flt not in name:
                            continue
                        if compat == "0.10" and rb != 16:
                            res.skip(name, "compat=0.10 (v2) images only have 16-bit refcounts")
                            continue
                        res.case(name, one_case, d, c, rb, compat, pre)
    finally:
        uqtest.cleanup(d)
    for n in sorted(notes):
        print(f"note: {n}")
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
