# SPDX-License-Identifier: MIT
"""Read and poke qcow2 images from python (stdlib only), and turn a valid
qemu-img image into the hand-crafted bad images the bad-input tests feed to
every command.

    python3 tests/images/qcow2img.py OUTDIR     writes every bad image to OUTDIR

The on-disk format is docs/interop/qcow2.rst in QEMU; every field big-endian.
"""

import os
import shutil
import struct
import subprocess
import sys

MAGIC = 0x514649FB
EXT_END = 0x00000000
EXT_FEATURE_TABLE = 0x6803F857
OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1

# (name, offset, struct format) of the header fields.
FIELDS = [
    ("magic", 0, ">I"),
    ("version", 4, ">I"),
    ("backing_file_offset", 8, ">Q"),
    ("backing_file_size", 16, ">I"),
    ("cluster_bits", 20, ">I"),
    ("size", 24, ">Q"),
    ("crypt_method", 32, ">I"),
    ("l1_size", 36, ">I"),
    ("l1_table_offset", 40, ">Q"),
    ("refcount_table_offset", 48, ">Q"),
    ("refcount_table_clusters", 56, ">I"),
    ("nb_snapshots", 60, ">I"),
    ("snapshots_offset", 64, ">Q"),
    ("incompatible", 72, ">Q"),
    ("compatible", 80, ">Q"),
    ("autoclear", 88, ">Q"),
    ("refcount_order", 96, ">I"),
    ("header_length", 100, ">I"),
]
V2_FIELDS = 13


class Image:
    """A qcow2 image file opened for reading and in-place poking."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(104)
        if len(raw) < 72:
            raise ValueError(f"{path}: too short for a qcow2 header")
        self.h = {}
        for i, (name, off, fmt) in enumerate(FIELDS):
            if i >= V2_FIELDS and len(raw) < off + struct.calcsize(fmt):
                break
            self.h[name] = struct.unpack_from(fmt, raw, off)[0]
        if self.h["magic"] != MAGIC:
            raise ValueError(f"{path}: not a qcow2 image")
        if self.h["version"] == 2:
            self.h.update(incompatible=0, compatible=0, autoclear=0,
                          refcount_order=4, header_length=72)
        self.cluster_size = 1 << self.h["cluster_bits"]
        self.rc_order = self.h["refcount_order"]
        self.l2_entries = self.cluster_size // 8

    # ---- raw access ---------------------------------------------------
    def pread(self, off, n):
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(n)

    def pwrite(self, off, data):
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(data)

    def u64(self, off):
        return struct.unpack(">Q", self.pread(off, 8).ljust(8, b"\0"))[0]

    def set_u64(self, off, v):
        self.pwrite(off, struct.pack(">Q", v))

    def set_field(self, name, value):
        for fname, off, fmt in FIELDS:
            if fname == name:
                self.pwrite(off, struct.pack(fmt, value))
                self.h[name] = value
                return
        raise KeyError(name)

    # ---- L1 / L2 --------------------------------------------------------
    def l1_entry_off(self, i):
        return self.h["l1_table_offset"] + 8 * i

    def l1(self):
        n = self.h["l1_size"]
        data = self.pread(self.h["l1_table_offset"], 8 * n)
        return list(struct.unpack(f">{n}Q", data.ljust(8 * n, b"\0")))

    def l2_entry_off(self, guest_off):
        """Host offset of the L2 entry for @guest_off, or None (no L2 table)."""
        cb = self.h["cluster_bits"]
        l1i = guest_off >> (cb + cb - 3)
        l2_off = self.l1()[l1i] & OFFSET_MASK
        if not l2_off:
            return None
        return l2_off + 8 * ((guest_off >> cb) & (self.l2_entries - 1))

    def data_clusters(self):
        """[(guest_off, l2 entry host offset, host data offset)] of every
        normal allocated data cluster."""
        out = []
        cb = self.h["cluster_bits"]
        for l1i, l1e in enumerate(self.l1()):
            l2_off = l1e & OFFSET_MASK
            if not l2_off:
                continue
            data = self.pread(l2_off, self.cluster_size)
            for j, e in enumerate(struct.unpack(f">{self.l2_entries}Q", data)):
                if e & COMPRESSED:
                    continue
                host = e & OFFSET_MASK
                if host:
                    guest = ((l1i << (cb - 3)) + j) << cb
                    out.append((guest, l2_off + 8 * j, host))
        return out

    # ---- refcounts ------------------------------------------------------
    def _rc_location(self, host_off):
        """(refcount block offset, index in block) of the cluster at @host_off."""
        cb = self.h["cluster_bits"]
        cluster = host_off >> cb
        per_block_bits = cb + 3 - self.rc_order
        rt_index = cluster >> per_block_bits
        rb = self.u64(self.h["refcount_table_offset"] + 8 * rt_index) & ~0x1FF
        if not rb:
            raise ValueError(f"no refcount block covers host offset {host_off:#x}")
        return rb, cluster & ((1 << per_block_bits) - 1)

    def refcount(self, host_off):
        rb, i = self._rc_location(host_off)
        bits = 1 << self.rc_order
        if bits >= 8:
            n = bits // 8
            return int.from_bytes(self.pread(rb + i * n, n), "big")
        byte = self.pread(rb + i * bits // 8, 1)[0]
        shift = (i * bits) % 8
        return (byte >> shift) & ((1 << bits) - 1)

    def set_refcount(self, host_off, value):
        rb, i = self._rc_location(host_off)
        bits = 1 << self.rc_order
        if bits >= 8:
            n = bits // 8
            self.pwrite(rb + i * n, value.to_bytes(n, "big"))
            return
        off = rb + i * bits // 8
        byte = self.pread(off, 1)[0]
        shift = (i * bits) % 8
        mask = ((1 << bits) - 1) << shift
        self.pwrite(off, bytes([(byte & ~mask) | ((value << shift) & mask)]))

    # ---- header extensions ----------------------------------------------
    def extensions(self):
        """[(type, data)] up to the end marker (v3 and v2 alike)."""
        off = self.h["header_length"]
        limit = self.cluster_size
        if self.h["backing_file_offset"]:
            limit = min(limit, self.h["backing_file_offset"])
        buf = self.pread(0, limit)
        exts = []
        while off + 8 <= len(buf):
            etype, elen = struct.unpack_from(">II", buf, off)
            if etype == EXT_END:
                break
            exts.append((etype, buf[off + 8:off + 8 + elen]))
            off += 8 + ((elen + 7) & ~7)
        return exts

    def set_extensions(self, exts):
        """Rewrite the extension area (the backing file name is not moved:
        only for images without one)."""
        if self.h["backing_file_offset"]:
            raise ValueError("set_extensions: images with a backing file are not supported")
        out = bytearray()
        for etype, data in exts:
            out += struct.pack(">II", etype, len(data)) + data
            out += b"\0" * (-len(data) % 8)
        out += struct.pack(">II", EXT_END, 0)
        start = self.h["header_length"]
        if start + len(out) > self.cluster_size:
            raise ValueError("extensions do not fit in the header cluster")
        self.pwrite(start, bytes(out) + b"\0" * (self.cluster_size - start - len(out)))


def feature_entry(ftype, bit, name):
    return struct.pack(">BB46s", ftype, bit, name.encode())


# ---- bad images ---------------------------------------------------------
#
# Each generator takes a copy of a valid image (64 KiB clusters, v3, 16-bit
# refcounts, some data at guest offset 0) and breaks one thing.

UNKNOWN_BIT = 20
UNKNOWN_NAME = "uqtest-frobnication"


def _truncated(img):
    with open(img.path, "r+b") as f:
        f.truncate(50)


def _bad_magic(img):
    img.pwrite(0, b"QFJ\xfb")


def _version4(img):
    img.set_field("version", 4)


def _cluster_bits(bits):
    def gen(img):
        img.set_field("cluster_bits", bits)
    return gen


def _l1_beyond_eof(img):
    size = os.path.getsize(img.path)
    img.set_field("l1_table_offset", (size + 16 * img.cluster_size) & ~(img.cluster_size - 1))


def _l1_huge(img):
    img.set_field("l1_size", 0x7FFFFFFF)


def _reftable_beyond_eof(img):
    size = os.path.getsize(img.path)
    img.set_field("refcount_table_offset",
                  (size + 16 * img.cluster_size) & ~(img.cluster_size - 1))


def _reftable_huge(img):
    img.set_field("refcount_table_clusters", 0x7FFFFFFF)


def _l2_misaligned(img):
    e = img.l1()[0]
    if not e & OFFSET_MASK:
        raise ValueError("bad image source has no L2 table for guest offset 0")
    img.set_u64(img.l1_entry_off(0), e + 512)


def _unknown_feature(named):
    def gen(img):
        exts = [(t, d) for t, d in img.extensions() if t != EXT_FEATURE_TABLE]
        if named:
            table = b"".join(d for t, d in img.extensions() if t == EXT_FEATURE_TABLE)
            exts.append((EXT_FEATURE_TABLE, table + feature_entry(0, UNKNOWN_BIT, UNKNOWN_NAME)))
        img.set_extensions(exts)
        img.set_field("incompatible", img.h["incompatible"] | (1 << UNKNOWN_BIT))
    return gen


def _misalign(field):
    def gen(img):
        img.set_field(field, img.h[field] + 512)
    return gen


def _ext_past_cluster(img):
    """An extension whose length runs far past the header cluster."""
    img.pwrite(img.h["header_length"], struct.pack(">II", 0x75710002, 0x100000))


def _backing_name_past_cluster(img):
    img.set_field("backing_file_offset", img.cluster_size - 4)
    img.set_field("backing_file_size", 100)


def _last_cluster(img):
    return (os.path.getsize(img.path) - 1) & ~(img.cluster_size - 1)


def _snapshot_table_garbage(img):
    """Three snapshots whose table is a data cluster (0xa5 bytes): the first
    entry's id and name lengths run past the end of the file."""
    img.set_field("nb_snapshots", 3)
    img.set_field("snapshots_offset", _last_cluster(img))


def _snapshots_too_many(img):
    img.set_field("nb_snapshots", 0x7FFFFFFF)
    img.set_field("snapshots_offset", _last_cluster(img))


def _compressed_out_of_range(img):
    """Guest cluster 0 compressed, its bytes far past the end of the file."""
    size = os.path.getsize(img.path)
    img.set_u64(img.l2_entry_off(0), COMPRESSED | (size * 16))


def _l2_beyond_eof(img):
    """L1 entry 0 points at an L2 table 1 TiB past the end of the file."""
    img.set_u64(img.l1_entry_off(0), ((os.path.getsize(img.path) + (1 << 40))
                                      & ~(img.cluster_size - 1)) | COPIED)


def _luks_without_header(img):
    img.set_field("crypt_method", 2)


# name -> (generator, what it breaks)
BAD_IMAGES = {
    "truncated": (_truncated, "file cut to 50 bytes, inside the header"),
    "bad-magic": (_bad_magic, "magic is not QFI\\xfb"),
    "version4": (_version4, "header version 4"),
    "cluster-bits-8": (_cluster_bits(8), "cluster_bits 8 (below 512 bytes)"),
    "cluster-bits-22": (_cluster_bits(22), "cluster_bits 22 (above 2 MiB)"),
    "l1-beyond-eof": (_l1_beyond_eof, "L1 table offset past the end of the file"),
    "l1-size-huge": (_l1_huge, "l1_size 0x7fffffff"),
    "reftable-beyond-eof": (_reftable_beyond_eof, "refcount table offset past the end of the file"),
    "reftable-huge": (_reftable_huge, "refcount_table_clusters 0x7fffffff"),
    "l2-misaligned": (_l2_misaligned, "L1 entry 0 points at an L2 table 512 bytes off cluster alignment"),
    "unknown-feature": (_unknown_feature(False), f"incompatible feature bit {UNKNOWN_BIT}, no feature-name table"),
    "unknown-feature-named": (_unknown_feature(True),
                              f"incompatible feature bit {UNKNOWN_BIT} named '{UNKNOWN_NAME}' in the feature-name table"),
    "l1-misaligned": (_misalign("l1_table_offset"), "L1 table offset 512 bytes off cluster alignment"),
    "reftable-misaligned": (_misalign("refcount_table_offset"),
                            "refcount table offset 512 bytes off cluster alignment"),
    "header-length-huge": (lambda img: img.set_field("header_length", 0xFFFFFFF8),
                           "header_length 0xfffffff8"),
    "ext-past-cluster": (_ext_past_cluster, "a header extension of 1 MiB in a 64 KiB header cluster"),
    "backing-name-past-cluster": (_backing_name_past_cluster,
                                  "backing file name running past the header cluster"),
    "size-huge": (lambda img: img.set_field("size", 1 << 63), "virtual size 2^63"),
    "refcount-order-7": (lambda img: img.set_field("refcount_order", 7), "refcount_order 7 (128-bit)"),
    "snapshot-table-garbage": (_snapshot_table_garbage,
                               "3 snapshots in a table that is a data cluster, entries past EOF"),
    "snapshots-too-many": (_snapshots_too_many, "nb_snapshots 0x7fffffff"),
    "compressed-out-of-range": (_compressed_out_of_range,
                                "L2 entry 0 compressed, its bytes far past the end of the file"),
    "l2-beyond-eof": (_l2_beyond_eof, "L1 entry 0 points at an L2 table 1 TiB past the end of the file"),
    "luks-without-header": (_luks_without_header, "crypt_method 2 (LUKS) without an encryption header"),
}


def make_source(path):
    """A valid image for the generators: v3, 64 KiB clusters, data at 0."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "cluster_size=65536,compat=1.1,refcount_bits=16", path, "64M"],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 192k",
                    "-c", "write -P 0xa5 32M 64k", path],
                   check=True, stdout=subprocess.DEVNULL)


def make_bad(name, src, dst):
    """Copy @src to @dst and break it as BAD_IMAGES[@name] says."""
    shutil.copyfile(src, dst)
    BAD_IMAGES[name][0](Image(dst))


def main(argv):
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUTDIR", file=sys.stderr)
        return 2
    os.makedirs(argv[1], exist_ok=True)
    src = os.path.join(argv[1], "valid.qcow2")
    make_source(src)
    for name, (_, what) in BAD_IMAGES.items():
        make_bad(name, src, os.path.join(argv[1], name + ".qcow2"))
        print(f"{name}.qcow2: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
