#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""What we do not interpret is handled as the spec says:
- persistent bitmaps: a read-write open clears the bitmaps autoclear bit,
  so qemu-img no longer trusts bitmaps we did not update (it says so and
  drops them; their clusters leak, never corrupt); the data stays right;
- unknown autoclear bits are cleared on a read-write open, unknown
  compatible bits and unknown header extensions are kept byte for byte;
- a read-only open changes nothing at all.
"""

import json
import os
import struct
import sys

import uqtest

MiB = 1 << 20
HDR_COMPAT, HDR_AUTOCLEAR, HDR_LEN = 80, 88, 100
UNKNOWN_EXT = 0x7a7a0001
UNKNOWN_DATA = b"kept verbatim by ublk-qcow2\x00\x01\x02"


def header_fields(path):
    with open(path, "rb") as f:
        h = f.read(4096)
    compat, autoclear = struct.unpack(">QQ", h[HDR_COMPAT:HDR_COMPAT + 16])
    return compat, autoclear, h


def extensions(h):
    """[(type, data)] of the header extensions."""
    off = struct.unpack(">I", h[HDR_LEN:HDR_LEN + 4])[0]
    out = []
    while off + 8 <= len(h):
        t, n = struct.unpack(">II", h[off:off + 8])
        if t == 0:
            break
        out.append((t, h[off + 8:off + 8 + n]))
        off += 8 + ((n + 7) & ~7)
    return out


def add_unknowns(path):
    """Set compatible bit 9 and autoclear bit 9, and put an unknown extension
    first (the others move up; the header cluster has room)."""
    compat, autoclear, h = header_fields(path)
    hl = struct.unpack(">I", h[HDR_LEN:HDR_LEN + 4])[0]
    ext = struct.pack(">II", UNKNOWN_EXT, len(UNKNOWN_DATA)) + UNKNOWN_DATA
    ext += b"\0" * (-len(ext) % 8)
    rest = h[hl:]
    backing_off, backing_len = struct.unpack(">QI", h[8:20])
    with open(path, "r+b") as f:
        f.seek(HDR_COMPAT)
        f.write(struct.pack(">QQ", compat | (1 << 9), autoclear | (1 << 9)))
        f.seek(hl)
        f.write(ext + rest[:4096 - hl - len(ext)])
        if backing_off:
            f.seek(8)
            f.write(struct.pack(">Q", backing_off + len(ext)))


def case_bitmaps(d):
    img = os.path.join(d, "bm.qcow2")
    mirror = os.path.join(d, "bm.raw")
    uqtest.qemu_create(img, 64 * MiB)
    uqtest.qemu_img("bitmap", "--add", img, "b0")
    uqtest.qemu_io("qcow2", img, ["write -P 0x11 0 1M"])
    _, autoclear, _ = header_fields(img)
    if not autoclear & 1:
        return "qemu-img did not set the bitmaps autoclear bit (test setup)"
    before = uqtest.sha256(img)
    uqtest.uq("io", "-r", img, "-c", "read -P 0x11 0 1M")
    uqtest.uq("convert", "-O", "raw", img, mirror)
    if uqtest.sha256(img) != before:
        return "a read-only open changed the image"
    uqtest.uq("io", img, "-c", "write -P 0x22 2M 1M")
    _, autoclear, _ = header_fields(img)
    if autoclear & 1:
        return "the bitmaps autoclear bit survived a read-write open"
    info = uqtest.qemu_img("info", img, check=False)
    if "b0" in info.stdout:
        return f"qemu-img still lists the stale bitmap:\n{info.stdout}"
    uqtest.qemu_io("raw", mirror, ["write -P 0x22 2M 1M"])
    p = uqtest.qemu_img("compare", "-f", "qcow2", "-F", "raw", img, mirror, check=False)
    if p.returncode != 0:
        return f"content: {(p.stdout + p.stderr).strip()}"
    p = uqtest.qemu_img("check", "--output=json", img, check=False)
    if p.returncode not in (0, 3) or json.loads(p.stdout).get("corruptions", 0):
        return f"qemu-img check exits {p.returncode} (leaks are expected, errors not):\n{p.stdout}"
    return None


def case_unknowns(d, backing):
    img = os.path.join(d, "u.qcow2")
    base = os.path.join(d, "ubase.qcow2")
    if backing:
        uqtest.qemu_create(base, 16 * MiB)
        uqtest.qemu_io("qcow2", base, ["write -P 0x33 0 16M"])
        uqtest.qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", img)
    else:
        uqtest.qemu_create(img, 16 * MiB)
    add_unknowns(img)
    compat0, _, h0 = header_fields(img)
    exts0 = extensions(h0)
    if (UNKNOWN_EXT, UNKNOWN_DATA) not in exts0 or not compat0 & (1 << 9):
        return "test setup: the unknown extension or bit did not go in"
    p = uqtest.qemu_img("check", img, check=False)
    if p.returncode != 0:
        return f"test setup: qemu-img check of the patched image exits {p.returncode}"
    before = uqtest.sha256(img)
    uqtest.uq("io", "-r", img, "-c", "read 0 64k")
    if uqtest.sha256(img) != before:
        return "a read-only open changed the image"
    uqtest.uq("io", img, "-c", "write -P 0x44 1M 100k", "-c", "flush")
    compat, autoclear, h = header_fields(img)
    if autoclear & (1 << 9):
        return f"unknown autoclear bit 9 not cleared (autoclear {autoclear:#x})"
    if compat != compat0:
        return f"compatible bits changed: {compat0:#x} -> {compat:#x}"
    if (UNKNOWN_EXT, UNKNOWN_DATA) not in extensions(h):
        return f"the unknown extension was not kept: {extensions(h)} (was {exts0})"
    uqtest.qemu_io("qcow2", img, ["read -P 0x44 1M 100k"] +
                   (["read -P 0x33 0 1M"] if backing else ["read -P 0 0 1M"]))
    p = uqtest.qemu_img("check", img, check=False)
    if p.returncode != 0:
        return f"qemu-img check exits {p.returncode}:\n{uqtest.tail(p.stdout + p.stderr, 6)}"
    return None


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    res = uqtest.Results("test_autoclear")
    d = uqtest.scratch_dir("autoclear")
    try:
        res.case("persistent bitmaps are dropped, not trusted", case_bitmaps, d)
        res.case("unknown bits and extensions", case_unknowns, d, False)
        res.case("unknown bits and extensions, with a backing file", case_unknowns, d, True)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
