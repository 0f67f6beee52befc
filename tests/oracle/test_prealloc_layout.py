#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""`ublk-qcow2 create -o preallocation=metadata|falloc|full` must write the
file `qemu-img create` writes: the same bytes (header, refcount table and
blocks, L1 and L2 tables, where the data clusters go), the same length, and
the same allocated ranges (which parts are written or fallocated and which
stay holes), for the image and its external data file, across cluster
sizes, sizes that end inside a cluster, refcount widths, extended L2,
compat=0.10, lazy refcounts, data_file(_raw) and LUKS. LUKS headers hold
random keys: there everything but the LUKS area's bytes must agree, and
`qemu-img check` must find no errors and no leaks. `convert -O qcow2 -o
preallocation=...` of a raw file must write what `qemu-img convert` writes.
"""

import os
import struct

import uqtest

PW = "prealloc-test"
LUKS = f"encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
SECRET = ["--object", f"secret,id=sec0,data={PW}"]


def extents(path):
    """The file's data ranges as SEEK_DATA/SEEK_HOLE report them."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, off = os.fstat(fd).st_size, 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            off = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, off))
    finally:
        os.close(fd)
    return out


def luks_area(path):
    """(offset, length) of the LUKS header area, from the crypto extension."""
    with open(path, "rb") as f:
        h = f.read(4096)
    off = struct.unpack(">I", h[100:104])[0]
    while off + 8 <= len(h):
        kind, length = struct.unpack(">II", h[off:off + 8])
        if kind == 0:
            break
        if kind == 0x0537be77:
            return struct.unpack(">QQ", h[off + 8:off + 24])
        off += 8 + (length + 7) // 8 * 8
    raise AssertionError(f"{path}: no crypto header extension")


def masked(path, area):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if area:
        off, length = area
        data[off:off + length] = bytes(length)
    return bytes(data)


def compare(ours, ref, area=None):
    """None if the two files agree (bytes outside @area, length, extents)."""
    so, sr = os.stat(ours), os.stat(ref)
    if so.st_size != sr.st_size:
        return f"{os.path.basename(ours)}: {so.st_size} bytes, qemu-img's {sr.st_size}"
    if area is None:
        diff = uqtest.first_difference(ours, ref)
        if diff:
            return f"{os.path.basename(ours)}: {diff}"
    elif masked(ours, area) != masked(ref, area):
        a, b = masked(ours, area), masked(ref, area)
        i = next(i for i in range(len(a)) if a[i] != b[i])
        return f"{os.path.basename(ours)}: first difference outside LUKS at {i:#x}"
    eo, er = extents(ours), extents(ref)
    if eo != er:
        show = lambda e: " ".join(f"{s:#x}-{t:#x}" for s, t in e[:12])
        return (f"{os.path.basename(ours)}: allocated ranges differ:\n"
                f"ours: {show(eo)}\nqemu: {show(er)}")
    if so.st_blocks != sr.st_blocks:
        return (f"{os.path.basename(ours)}: {so.st_blocks} blocks allocated, "
                f"qemu-img's {sr.st_blocks}")
    return None


def one_case(opts, size):
    d = uqtest.scratch_dir("prealloc")
    try:
        mine, theirs = os.path.join(d, "ours"), os.path.join(d, "ref")
        os.mkdir(mine)
        os.mkdir(theirs)
        luks = "encrypt.format" in opts
        extra = SECRET if luks else []
        # Relative data file names: the same bytes in both headers.
        uqtest.uq("create", *extra, "-o", opts, "img.qcow2", size, cwd=mine)
        uqtest.qemu_img_luks("create", "-q", *extra, "-f", "qcow2", "-o", opts, "img.qcow2", size,
                             cwd=theirs)
        ours, ref = os.path.join(mine, "img.qcow2"), os.path.join(theirs, "img.qcow2")
        err = compare(ours, ref, luks_area(ref) if luks else None)
        if not err and "data_file=" in opts:
            err = compare(os.path.join(mine, "data.raw"), os.path.join(theirs, "data.raw"))
        if err:
            return err
        if not luks:
            return None		# qemu-img's own bytes: its check has nothing to add
        if luks_area(ours) != luks_area(ref):
            return f"LUKS area {luks_area(ours)}, qemu-img's {luks_area(ref)}"
        chk = uqtest.qemu_img("check", *SECRET, "--image-opts",
                              f"driver=qcow2,file.filename={ours},encrypt.key-secret=sec0",
                              check=False, cwd=mine)
        if chk.returncode != 0 or "No errors were found" not in chk.stdout:
            return f"qemu-img check (exit {chk.returncode}):\n{chk.stdout}{chk.stderr}"
        return None
    finally:
        uqtest.cleanup(d)


def convert_case(opts):
    """`convert -O qcow2 -o OPTS` of a raw file with data, a zeroed block and holes."""
    d = uqtest.scratch_dir("prealloc")
    try:
        src = os.path.join(d, "src.raw")
        ours, ref = os.path.join(d, "ours.qcow2"), os.path.join(d, "ref.qcow2")
        uqtest.qemu_img("create", "-q", "-f", "raw", src, "3147264")
        uqtest.qemu_io("raw", src, ["write -P 5 0 64k", "write -P 0 64k 64k",
                                    "write -P 6 1M 100k", "write -P 7 3000k 10k"])
        uqtest.uq("convert", "-O", "qcow2", "-o", opts, src, ours)
        uqtest.qemu_img("convert", "-O", "qcow2", "-o", opts, src, ref)
        return compare(ours, ref)
    finally:
        uqtest.cleanup(d)


def cases():
    modes = ("metadata", "falloc", "full")
    # Sizes: empty, 4k-aligned but not 64k-aligned, inside a 4k cluster, several L2 tables.
    for c in ("512", "4k", "64k", "2M"):
        for size in ("0", "1000k", "3147264", "5M"):
            for m in modes:
                yield f"cluster_size={c},preallocation={m}", size
    for m in modes:
        for c in ("512", "4k"):
            for rb in (1, 8, 64):
                yield f"cluster_size={c},refcount_bits={rb},preallocation={m}", "1000k"
        # QEMU's refcount table fills up and moves on the way.
        yield f"cluster_size=512,refcount_bits=64,preallocation={m}", "5M"
        for c in ("16k", "2M"):
            for size in ("1000k", "3147264"):
                yield f"cluster_size={c},extended_l2=on,preallocation={m}", size
        for c in ("4k", "64k"):
            yield f"cluster_size={c},compat=0.10,preallocation={m}", "3147264"
            yield f"cluster_size={c},lazy_refcounts=on,preallocation={m}", "5M"
        for m2 in (m, "off") if m == "metadata" else (m,):
            for c in ("4k", "64k"):
                for size in ("1000k", "3147264"):
                    yield f"cluster_size={c},data_file=data.raw,preallocation={m2}", size
        for size in ("1000k", "5M"):
            yield f"cluster_size=4k,data_file=data.raw,data_file_raw=on,preallocation={m}", size
        yield f"cluster_size=64k,extended_l2=on,data_file=data.raw,preallocation={m}", "3147264"
    for m in ("off",) + modes:
        for c, size in (("64k", "5M"), ("4k", "3147264")):
            yield f"{LUKS},cluster_size={c},preallocation={m}", size


def main():
    uqtest.require_tools("qemu-img")
    res = uqtest.Results("test_prealloc_layout")
    for opts, size in cases():
        res.case(f"{opts.replace(LUKS, 'luks')} size={size}", one_case, opts, size)
    for c in ("512", "4k", "64k"):
        for m in ("metadata", "falloc", "full"):
            opts = f"cluster_size={c},preallocation={m}"
            res.case(f"convert {opts}", convert_case, opts)
    res.finish()


if __name__ == "__main__":
    main()
