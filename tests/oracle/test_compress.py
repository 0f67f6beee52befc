#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Compressed clusters written by us, and writes into compressed clusters.

1. `ublk-qcow2 convert -c` against `qemu-img convert -c` on the same source,
   for cluster sizes 512, 4k, 64k and 2M and both compression types, from a
   raw file, a qcow2 image and a qcow2 overlay over a backing file. The
   source mixes random (incompressible), repetitive, zero and half-zero
   regions and ends in a partial cluster. Ours must be `qemu-img compare`
   equal to the source, `qemu-img check` clean, with the same allocation
   pattern in `qemu-img map --output=json` (compressed extents carry no
   offset there) and the same allocated/compressed cluster counts in
   `qemu-img check`, and about the same file size; it must read back
   through our own `convert -O raw` too.
2. Guest writes into compressed clusters: qemu-io into an image we
   compressed, and our `io` into one qemu-img compressed, each against a
   raw mirror; `qemu-img check` must find no errors and no leaks (so the
   host clusters' refcounts dropped exactly as the compressed clusters
   sharing them were released).
3. Bad input: -c with a raw target, zstd on compat=0.10, and compressed
   descriptors pointing past the end of the file (or a file cut short)
   read by `convert -O raw` and `io`: one error line, nonzero exit.
"""

import json
import os
import random
import struct

import uqtest

KiB, MiB = 1 << 10, 1 << 20
CLUSTERS = [512, 4096, 65536, 2 * MiB]
TYPES = ["zlib", "zstd"]
REGIONS = 20


def make_source(path, c, seed):
    """A raw file of REGIONS regions (each max(c, 64k)) of mixed content,
    plus a partial cluster of 1500 bytes at the end (not even a whole
    sector: the target rounds its size up)."""
    rng = random.Random(seed)
    r = max(c, 64 * KiB)
    with open(path, "wb") as f:
        for i in range(REGIONS):
            kind = i % 5
            if kind == 0:
                data = rng.randbytes(r)
            elif kind == 1:
                data = (b"qcow2 compressed cluster %d " % i) * (r // 16)
            elif kind == 2:
                data = bytes(r)
            elif kind == 3:
                data = rng.randbytes(r // 2) + bytes(r - r // 2)
            else:
                data = bytes(range(256)) * (r // 256)
            assert len(data) >= r
            f.write(data[:r])
        f.write(b"tail" * 375)
    return REGIONS * r + 1500


def map_pattern(path):
    out = uqtest.qemu_img("map", "--output=json", path).stdout
    return [(e["start"], e["length"], e["present"], e["zero"], e["data"], "offset" in e)
            for e in json.loads(out)]


def check_counts(path):
    """qemu-img check must be clean; returns its 'allocated'/'compressed' line parts."""
    p = uqtest.qemu_img("check", path, check=False)
    if p.returncode != 0 or "No errors were found" not in p.stdout:
        raise AssertionError(f"qemu-img check {path} (exit {p.returncode}):\n"
                             f"{p.stdout}{p.stderr}")
    for line in p.stdout.splitlines():
        if "allocated" in line:
            parts = line.split(",")
            return parts[0].strip(), parts[2].strip()
    raise AssertionError(f"no allocation line in qemu-img check output:\n{p.stdout}")


def compare_with_qemu(d, src, src_fmt, c, ctype, extra=""):
    ours = os.path.join(d, "ours.qcow2")
    ref = os.path.join(d, "ref.qcow2")
    back = os.path.join(d, "back.raw")
    want = os.path.join(d, "want.raw")
    opts = f"cluster_size={c},compression_type={ctype}" + extra
    uqtest.uq("convert", "-c", "-O", "qcow2", "-o", opts, src, ours)
    uqtest.qemu_img("convert", "-c", "-f", src_fmt, "-O", "qcow2", "-o", opts, src, ref)
    uqtest.qemu_img("compare", "-f", src_fmt, "-F", "qcow2", src, ours)
    ours_counts = check_counts(ours)
    ref_counts = check_counts(ref)
    if ours_counts != ref_counts:
        return f"cluster counts differ: ours {ours_counts}, qemu-img {ref_counts}"
    if map_pattern(ours) != map_pattern(ref):
        return (f"allocation pattern differs from qemu-img's:\nours {map_pattern(ours)}\n"
                f"qemu {map_pattern(ref)}")
    info = json.loads(uqtest.qemu_img("info", "--output=json", ours).stdout)
    got_type = info["format-specific"]["data"].get("compression-type")
    if got_type != ctype:
        return f"compression type {got_type}, expected {ctype}"
    so, sr = os.path.getsize(ours), os.path.getsize(ref)
    if abs(so - sr) > max(sr // 20, 2 * c):
        return f"file size {so} bytes, qemu-img's {sr}"
    uqtest.uq("convert", "-O", "raw", ours, back)
    uqtest.qemu_img("convert", "-f", src_fmt, "-O", "raw", src, want)
    return uqtest.first_difference(back, want)


def case_convert(d, c, ctype, source, extra=""):
    raw = os.path.join(d, "src.raw")
    make_source(raw, c, c ^ len(source))
    if source == "raw":
        return compare_with_qemu(d, raw, "raw", c, ctype, extra)
    q = os.path.join(d, "src.qcow2")
    uqtest.qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, q)
    if source == "qcow2":
        return compare_with_qemu(d, q, "qcow2", c, ctype)
    ov = os.path.join(d, "overlay.qcow2")
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-b", q, "-F", "qcow2", ov)
    r = max(c, 64 * KiB)
    uqtest.qemu_io("qcow2", ov, [f"write -P 0x5a {r // 2} {r}",
                                 f"write -z {3 * r} {r}",
                                 f"write -P 0x3c {6 * r + 512} 4096"])
    return compare_with_qemu(d, ov, "qcow2", c, ctype)


def check_clean(path):
    p = uqtest.qemu_img("check", path, check=False)
    if p.returncode != 0 or "No errors were found" not in p.stdout:
        raise AssertionError(f"qemu-img check {path} (exit {p.returncode}):\n"
                             f"{p.stdout}{p.stderr}")


def write_ops(c):
    """Writes into compressed clusters: partial ones (copy out), whole
    ones, zeroes and discards, over clusters that share host clusters."""
    return [
        f"write -P 0x11 {c // 2} 512",
        f"write -P 0x22 {3 * c - 512} 1024",
        f"write -P 0x33 {5 * c} {c}",
        f"write -z {6 * c} {2 * c}",
        f"discard {8 * c} {c}",
        f"write -P 0x44 {9 * c + 1024} {3 * c}",
        f"write -z {12 * c + 512} 1024",
        f"write -P 0x55 {14 * c} {6 * c}",
    ]


def case_write_into(d, c, ctype, writer):
    raw = os.path.join(d, "src.raw")
    size = 32 * c + 1536
    # Compressible everywhere, so every cluster is compressed and host
    # clusters are shared by several of them.
    with open(raw, "wb") as f:
        for i in range(33):
            f.write(((b"compressible cluster %d " % i) * (c // 16))[:min(c, size - i * c)])
    img = os.path.join(d, "img.qcow2")
    mirror = os.path.join(d, "mirror.raw")
    opts = f"cluster_size={c},compression_type={ctype}"
    if writer == "qemu-io":	# into an image we compressed
        uqtest.uq("convert", "-c", "-O", "qcow2", "-o", opts, raw, img)
    else:			# into one qemu-img compressed
        uqtest.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, raw, img)
    uqtest.qemu_img("convert", "-f", "qcow2", "-O", "raw", img, mirror)
    ops = write_ops(c)
    if writer == "qemu-io":
        uqtest.qemu_io("qcow2", img, ops)
    else:
        uqtest.uq("io", img, *[a for op in ops for a in ("-c", op)])
    mops = [op.replace("discard", "write -z") for op in ops]
    uqtest.qemu_io("raw", mirror, mops)
    check_clean(img)
    uqtest.qemu_img("compare", "-f", "raw", "-F", "qcow2", mirror, img)
    # Every compressed cluster released: all host references must go too.
    last = f"write -P 0x66 0 {size - size % c}"
    uqtest.uq("io", img, "-c", last)
    uqtest.qemu_io("raw", mirror, [last])
    check_clean(img)
    uqtest.qemu_img("compare", "-f", "raw", "-F", "qcow2", mirror, img)
    p = uqtest.qemu_img("check", "--output=json", img)
    res = json.loads(p.stdout)
    if res.get("compressed-clusters", 0) > 1:
        return f"{res['compressed-clusters']} compressed clusters left after overwriting"
    return None


def expect_error(args, what):
    p = uqtest.uq(*args, check=False)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    if p.returncode == 0:
        raise AssertionError(f"{what}: exit 0")
    if len(lines) != 1 or not lines[0].startswith("ublk-qcow2: "):
        raise AssertionError(f"{what}: expected one error line, got:\n{p.stderr}")
    return lines[0]


def first_compressed_entry(path):
    """(file offset of the first compressed L2 entry, its value, cluster_bits,
    the guest offset it maps)."""
    with open(path, "rb") as f:
        hdr = f.read(104)
        cluster_bits = struct.unpack(">I", hdr[20:24])[0]
        l1_size = struct.unpack(">I", hdr[36:40])[0]
        l1_off = struct.unpack(">Q", hdr[40:48])[0]
        f.seek(l1_off)
        l1 = struct.unpack(f">{l1_size}Q", f.read(8 * l1_size))
        for j, l1e in enumerate(l1):
            l2 = l1e & 0x00fffffffffffe00
            if not l2:
                continue
            f.seek(l2)
            n = (1 << cluster_bits) // 8
            for i, e in enumerate(struct.unpack(f">{n}Q", f.read(8 * n))):
                if e & (1 << 62):
                    guest = (j * n + i) << cluster_bits
                    return l2 + 8 * i, e, cluster_bits, guest
    raise AssertionError(f"{path}: no compressed cluster found")


def case_bad_input(d):
    raw = os.path.join(d, "src.raw")
    make_source(raw, 65536, 3)
    out = os.path.join(d, "out")
    expect_error(["convert", "-c", "-O", "raw", raw, out], "-c with a raw target")
    if os.path.exists(out):
        return "a failed convert -c -O raw left its target behind"
    expect_error(["create", "-o", "compat=0.10,compression_type=zstd", out, "1M"],
                 "zstd with compat=0.10")
    expect_error(["create", "-o", "compression_type=lz4", out, "1M"], "unknown type")
    if os.path.exists(out):
        return "a refused create left a file behind"

    for ctype in TYPES:
        img = os.path.join(d, f"c-{ctype}.qcow2")
        uqtest.uq("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", raw, img)
        # A descriptor pointing past the end of the file.
        bad = os.path.join(d, f"past-eof-{ctype}.qcow2")
        with open(img, "rb") as f:
            data = bytearray(f.read())
        pos, e, cb, guest = first_compressed_entry(img)
        shift = 62 - (cb - 8)
        host = (len(data) + (1 << 20)) & ((1 << shift) - 1)
        e = (e & ~((1 << shift) - 1)) | host
        data[pos:pos + 8] = struct.pack(">Q", e)
        with open(bad, "wb") as f:
            f.write(data)
        line = expect_error(["convert", "-O", "raw", bad, out], f"{ctype}: convert past EOF")
        if "bad" not in line and "past" not in line and "beyond" not in line:
            return f"{ctype}: unclear error for a descriptor past EOF: {line}"
        expect_error(["io", "-r", bad, "-c", f"read {guest} 512"], f"{ctype}: io read past EOF")
        # The file cut in the middle of its last compressed cluster.
        cut = os.path.join(d, f"cut-{ctype}.qcow2")
        with open(img, "rb") as f:
            data = f.read()
        pos, e, cb, guest = first_compressed_entry(img)
        host = e & ((1 << (62 - (cb - 8))) - 1)
        with open(cut, "wb") as f:
            f.write(data[:host + 16])
        expect_error(["convert", "-O", "raw", cut, out], f"{ctype}: convert of a cut file")
        expect_error(["io", "-r", cut, "-c", f"read {guest} 512"], f"{ctype}: io of a cut file")
    return None


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    res = uqtest.Results("test_compress")
    for c in CLUSTERS:
        for ctype in TYPES:
            sources = ["raw", "qcow2", "overlay"] if c in (4096, 65536) else ["raw"]
            for source in sources:
                d = uqtest.scratch_dir("compress")
                try:
                    res.case(f"convert -c c{c} {ctype} from {source}", case_convert, d, c,
                             ctype, source)
                finally:
                    uqtest.cleanup(d)
    # Refcount widths: 1 bit cannot share a host cluster, 64 bits can.
    for c, ctype, extra in ((65536, "zlib", ",refcount_bits=1"),
                            (4096, "zstd", ",refcount_bits=64"),
                            (65536, "zlib", ",compat=0.10"),
                            (1 << 20, "zstd", ",refcount_bits=2")):
        d = uqtest.scratch_dir("compress")
        try:
            res.case(f"convert -c c{c} {ctype}{extra} from raw", case_convert, d, c, ctype,
                     "raw", extra)
        finally:
            uqtest.cleanup(d)
    for c in (4096, 65536):
        for ctype in TYPES:
            for writer in ("qemu-io", "ours"):
                d = uqtest.scratch_dir("compress")
                try:
                    res.case(f"{writer} writes into compressed c{c} {ctype}", case_write_into,
                             d, c, ctype, writer)
                finally:
                    uqtest.cleanup(d)
    d = uqtest.scratch_dir("compress")
    try:
        res.case("bad input and truncated compressed clusters", case_bad_input, d)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    main()
