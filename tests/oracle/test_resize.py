#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""`ublk-qcow2 resize` against `qemu-img resize` on copies of one image.

Growing (a little; with the L1 table growing in place; across L1 growth
that moves the table, e.g. 64 KiB clusters from 1G to 10T), shrinking with
and without --shrink (across dropped L2 tables, to a size inside a
cluster), growing so far that the refcount table must grow first,
relative (+SIZE/-SIZE) and absolute sizes, v2 and v3 images,
512-byte clusters, an internal snapshot sharing the dropped tables, an
overlay over a larger backing file (the grown area
must not show the backing file), and raw files. After each step both
images must be `qemu-img compare` equal, `qemu-img check` clean, report
the same virtual size in `qemu-img info`, keep the data below the new end
byte for byte (qemu-io reads it back from ours), and our own `convert -O
raw` must read what qemu-img reads. Refused resizes leave the image
untouched and print one error line.
"""

import json
import os
import shutil

import uqtest

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def vsize(path):
    return json.loads(uqtest.qemu_img("info", "--output=json", path).stdout)["virtual-size"]


def check_clean(path):
    p = uqtest.qemu_img("check", path, check=False)
    if p.returncode != 0 or "No errors were found" not in p.stdout:
        raise AssertionError(f"qemu-img check {path} (exit {p.returncode}):\n"
                             f"{p.stdout}{p.stderr}")


def same(d, ours, ref, fmt="qcow2"):
    """ours and ref (resized by qemu-img) must agree in every way we can see."""
    if vsize(ours) != vsize(ref):
        raise AssertionError(f"virtual size {vsize(ours)}, qemu-img's {vsize(ref)}")
    if fmt == "qcow2":
        check_clean(ours)
    uqtest.qemu_img("compare", "-f", fmt, "-F", fmt, ours, ref)
    if vsize(ours) <= 64 * MiB:
        a, b = os.path.join(d, "a.raw"), os.path.join(d, "b.raw")
        uqtest.uq("convert", "-f", fmt, "-O", "raw", ours, a)
        uqtest.qemu_img("convert", "-f", fmt, "-O", "raw", ref, b)
        diff = uqtest.first_difference(a, b)
        if diff:
            raise AssertionError(f"our read of our resized image: {diff}")


def both(d, ours, ref, *args, fmt="qcow2"):
    """Resize ours and ref the same way; our output must be qemu-img's."""
    p = uqtest.uq("resize", "-f", fmt, *args[:-1], ours, args[-1])
    q = uqtest.qemu_img("resize", "-f", fmt, *args[:-1], ref, args[-1])
    if p.stdout != q.stdout:
        raise AssertionError(f"output {p.stdout!r}, qemu-img's {q.stdout!r}")
    same(d, ours, ref, fmt)


def refused(path, *args, fmt="qcow2"):
    before = uqtest.sha256(path)
    p = uqtest.uq("resize", "-f", fmt, *args[:-1], path, args[-1], check=False)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    if p.returncode == 0:
        raise AssertionError(f"resize {args} succeeded")
    if len(lines) != 1 or not lines[0].startswith("ublk-qcow2: "):
        raise AssertionError(f"resize {args}: expected one error line, got:\n{p.stderr}")
    if uqtest.sha256(path) != before:
        raise AssertionError(f"refused resize {args} changed the image")


def pair(d, size, writes, **opts):
    ours, ref = os.path.join(d, "ours.qcow2"), os.path.join(d, "ref.qcow2")
    uqtest.qemu_create(ours, size, **opts)
    if writes:
        uqtest.qemu_io("qcow2", ours, writes)
    shutil.copyfile(ours, ref)
    return ours, ref


def case_grow_small():
    d = uqtest.scratch_dir("resize")
    try:
        ours, ref = pair(d, 64 * MiB, ["write -P 0x11 0 3M", "write -P 0x22 60M 4M"])
        both(d, ours, ref, "+16M")
        both(d, ours, ref, str(100 * MiB))
        both(d, ours, ref, "+512")
        uqtest.qemu_io("qcow2", ours, ["read -P 0x11 0 3M", "read -P 0x22 60M 4M",
                                       f"read -P 0 64M {36 * MiB + 512}"])
    finally:
        uqtest.cleanup(d)


def case_grow_l1(cluster, start, steps, opts=None):
    d = uqtest.scratch_dir("resize")
    try:
        ours, ref = pair(d, start, ["write -P 0x33 0 1M", f"write -P 0x44 {start - MiB} 1M"],
                         cluster_size=cluster, **(opts or {}))
        for s in steps:
            both(d, ours, ref, s)
        # Data past the old end can be written and read back, by us and qemu.
        end = vsize(ours)
        w = [f"write -P 0x55 {end - 2 * MiB} 2M", f"write -P 0x66 {end // 2} 64k"]
        uqtest.uq("io", ours, *[a for c in w for a in ("-c", c)])
        uqtest.qemu_io("qcow2", ref, w)
        same(d, ours, ref)
        uqtest.qemu_io("qcow2", ours, ["read -P 0x33 0 1M", f"read -P 0x44 {start - MiB} 1M",
                                       f"read -P 0x55 {end - 2 * MiB} 2M"])
    finally:
        uqtest.cleanup(d)


def case_shrink(cluster, compat):
    d = uqtest.scratch_dir("resize")
    try:
        span = cluster * cluster // 8		# bytes one L2 table maps
        size = max(4 * span, 64 * MiB)
        compressed = compat == "1.1" and cluster <= 65536
        ours, ref = pair(d, size, [
            "write -P 0x11 0 2M",
            f"write -P 0x22 {size // 2 - MiB} 2M",		# crosses the first new end
            f"write -P 0x33 {size - 3 * MiB} 3M",		# in tables that go
            f"write {'-c ' if compressed else ''}-P 0x44 {size - 4 * MiB} {cluster}",
        ], cluster_size=cluster, compat=compat)
        refused(ours, str(size // 2))
        refused(ours, "--", f"-{MiB}")
        both(d, ours, ref, "--shrink", str(size // 2))
        # Inside a cluster: that cluster stays, the rest of it is gone.
        both(d, ours, ref, "--shrink", str(size // 2 - MiB + 1536))
        both(d, ours, ref, "--shrink", f"-{512}")
        end = size // 2 - MiB + 1024
        gone = (end + cluster - 1) // cluster * cluster
        # Growing back shows zeros where the dropped data was (the tail of
        # the cluster that stayed keeps its bytes, in QEMU too).
        both(d, ours, ref, str(size))
        uqtest.qemu_io("qcow2", ours, ["read -P 0x11 0 2M", f"read -P 0x22 {end - 1024} 1024",
                                       f"read -P 0 {gone} {size // 2 + MiB - gone}",
                                       f"read -P 0 {size - 4 * MiB} 4M"])
        so, sr = os.path.getsize(ours), os.path.getsize(ref)
        if so > sr + 4 * cluster:
            raise AssertionError(f"file {so} bytes after shrinking, qemu-img's {sr}")
    finally:
        uqtest.cleanup(d)


def case_grow_shrink_10t():
    d = uqtest.scratch_dir("resize")
    try:
        ours, ref = pair(d, GiB, ["write -P 0x77 0 1M"])
        both(d, ours, ref, "10T")
        w = [f"write -P 0x78 {5 * TiB} 1M", f"write -P 0x79 {10 * TiB - MiB} 1M"]
        uqtest.uq("io", ours, *[a for c in w for a in ("-c", c)])
        uqtest.qemu_io("qcow2", ref, w)
        same(d, ours, ref)
        both(d, ours, ref, "--shrink", "2G")
        uqtest.qemu_io("qcow2", ours, ["read -P 0x77 0 1M", f"read -P 0 1M {GiB}"])
        so, sr = os.path.getsize(ours), os.path.getsize(ref)
        if so > sr + 4 * 65536:
            raise AssertionError(f"file {so} bytes after shrinking, qemu-img's {sr}")
    finally:
        uqtest.cleanup(d)


def case_snapshot():
    """v3 with an internal snapshot: shrinking drops tables the snapshot
    shares; the snapshot must survive intact (qemu-img snapshot -a)."""
    d = uqtest.scratch_dir("resize")
    try:
        ours, ref = pair(d, 256 * MiB, ["write -P 0x11 0 200M"])
        for p in (ours, ref):
            uqtest.qemu_img("snapshot", "-c", "snap", p)
            uqtest.qemu_io("qcow2", p, ["write -P 0x22 100M 10M", "write -P 0x23 30M 64k"])
        both(d, ours, ref, "--shrink", "64M")
        both(d, ours, ref, "128M")
        for p in (ours, ref):
            uqtest.qemu_img("snapshot", "-a", "snap", p)
        same(d, ours, ref)
        uqtest.qemu_io("qcow2", ours, ["read -P 0x11 0 200M"])
    finally:
        uqtest.cleanup(d)


def case_backing():
    d = uqtest.scratch_dir("resize")
    try:
        base = os.path.join(d, "base.qcow2")
        uqtest.qemu_create(base, 64 * MiB)
        uqtest.qemu_io("qcow2", base, ["write -P 0xbb 0 64M"])
        ours, ref = os.path.join(d, "ours.qcow2"), os.path.join(d, "ref.qcow2")
        for p in (ours, ref):
            uqtest.qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", p,
                            str(32 * MiB))
            uqtest.qemu_io("qcow2", p, ["write -P 0x12 1M 1M"])
        # The grown area must read zeros, not the backing file.
        both(d, ours, ref, str(48 * MiB + 512))
        uqtest.qemu_io("qcow2", ours, [f"read -P 0 {32 * MiB} {16 * MiB + 512}",
                                       "read -P 0xbb 0 1M", "read -P 0x12 1M 1M"])
        both(d, ours, ref, "--shrink", str(16 * MiB))
        both(d, ours, ref, str(40 * MiB))
    finally:
        uqtest.cleanup(d)


def case_raw():
    d = uqtest.scratch_dir("resize")
    try:
        ours, ref = os.path.join(d, "ours.raw"), os.path.join(d, "ref.raw")
        with open(ours, "wb") as f:
            f.write(b"raw!" * (256 * KiB))
        shutil.copyfile(ours, ref)
        both(d, ours, ref, "+1M", fmt="raw")
        refused(ours, "512K", fmt="raw")
        both(d, ours, ref, "--shrink", "512K", fmt="raw")
        both(d, ours, ref, "1000001", fmt="raw")
    finally:
        uqtest.cleanup(d)


def case_bad_input():
    d = uqtest.scratch_dir("resize")
    try:
        img = os.path.join(d, "img.qcow2")
        uqtest.qemu_create(img, 64 * MiB)
        refused(img, str(64 * MiB + 1000))		# not a multiple of 512
        refused(img, "--", f"-{64 * MiB}")		# not positive
        refused(img, "0")
        refused(img, "+abc")
        refused(img, "1E")				# L1 table too large
        uqtest.qemu_img("snapshot", "-c", "s1", img)
        v2 = os.path.join(d, "v2.qcow2")
        uqtest.qemu_create(v2, 64 * MiB, compat="0.10")
        uqtest.qemu_img("snapshot", "-c", "s1", v2)
        refused(v2, "+1M")				# QEMU: v2 with snapshots
        p = uqtest.uq("resize", img, check=False)
        if p.returncode == 0:
            raise AssertionError("resize without SIZE succeeded")
    finally:
        uqtest.cleanup(d)


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    res = uqtest.Results("test_resize")
    res.case("grow a little, absolute and relative", case_grow_small)
    res.case("grow L1 in place (64k clusters, 1G -> 100G)", case_grow_l1, 65536, GiB,
             ["100G"])
    res.case("grow L1 moved (64k clusters, 1G -> 10T)", case_grow_l1, 65536, GiB, ["10T"])
    res.case("grow L1 moved (512-byte clusters, 1M -> 64M -> 1G)", case_grow_l1, 512, MiB * 2,
             ["64M", "1G"])
    # The new L1 table needs more refcount blocks than the table can point at:
    # the refcount table grows first (as QEMU's qcow2_refcount_area).
    res.case("grow past the refcount table (512-byte clusters, 2M -> 64G)", case_grow_l1, 512,
             MiB * 2, ["64G"])
    res.case("grow past the refcount table (512-byte clusters, refcount_bits=64)",
             case_grow_l1, 512, MiB * 2, ["8G", "+8G"], {"refcount_bits": 64})
    res.case("grow past the refcount table (1k clusters, 2M -> 200G)", case_grow_l1, 1024,
             MiB * 2, ["200G"])
    res.case("grow to 10T, write, shrink to 2G", case_grow_shrink_10t)
    for cluster in (512, 65536, 2 * MiB):
        for compat in ("0.10", "1.1"):
            res.case(f"shrink c{cluster} compat={compat}", case_shrink, cluster, compat)
    res.case("shrink and grow with an internal snapshot", case_snapshot)
    res.case("overlay over a larger backing file", case_backing)
    res.case("raw files", case_raw)
    res.case("refused resizes", case_bad_input)
    res.finish()


if __name__ == "__main__":
    main()
