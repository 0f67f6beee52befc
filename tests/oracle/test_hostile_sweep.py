#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Hostile images, qemu-img as the judge.  Images qemu-img/qemu-io made (v3
with an internal snapshot, a compressed and a zero cluster; v2 with a
snapshot) get one thing patched each (header fields, header extensions,
backing file name, L1/L2 entries, refcounts, snapshot entries: V3 and V2
below), and every patched image goes through info, info --output=json,
check --output=json, map, snapshot -l, io -r read, convert -O raw, io read
(read-write, on a copy), check -r leaks and check -r all (on copies), and
io-write: a sequence of writes at the patched structures (WRITES), on a
copy, ours and qemu-io's on the same bytes.

For every command:
  - no crash, no sanitizer report, no hang (20 s);
  - a refusal is exit 1 and one line on stderr naming the file (check's exit
    1 may follow qemu's report lines, its last line names the file);
  - the read-only commands leave the file byte for byte as it was; the
    read-write `io` may change it as qemu-io does on its copy, or set the
    corrupt bit / clear autoclear bits.
Against qemu on the same file:
  - qemu-img info refuses the image -> every command of ours refuses it;
  - qemu-img opens it -> our exit code is the one qemu's same command gives
    (info 0; check 0/2/3/1; map, snapshot -l, io, convert: 0 or refusal),
    except where DEVIATIONS says otherwise and why (including the known
    defects not fixed yet); and:
      convert: our raw output equals qemu-img's;
      check: the same "corruptions" and "leaks" counts;
      check -r all exit 0: qemu-img check calls our image clean, and where
        qemu's own repair succeeded, qemu-img compare finds the same data.
      io-write: where qemu-io's writes all succeed, ours do and the
        images read back the same (qemu-img convert -O raw); where one of
        its writes fails or it marks the image corrupt, ours fail (one line
        per failed write); either way qemu-img check finds no more
        corruptions in ours than in qemu's result (or than in the mutated
        image, where a write failed); WRITE_ALLOWED lists the exceptions.
UQ_CASES=a,b runs only those mutations; UQ_VERBOSE=1 prints every command.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import uqtest
import qcow2img
from qcow2img import Image, COMPRESSED, COPIED, OFFSET_MASK

TIMEOUT = 20
CORRUPT_BIT = 1 << 1


# ---- source images ----------------------------------------------------------

def make_v3(path):
    uqtest.qemu_create(path, "64M", cluster_size=65536, compat="1.1", refcount_bits=16)
    uqtest.qemu_io("qcow2", path, ["write -P 0x5a 0 192k", "write -P 0xa5 32M 64k",
                                   "write -c -P 0x3c 8M 64k", "write -z 16M 64k"])
    uqtest.qemu_img("snapshot", "-c", "s1", path)
    uqtest.qemu_io("qcow2", path, ["write -P 0x77 64k 64k", "write -P 0x11 40M 4k"])


def make_v2(path):
    uqtest.qemu_create(path, "16M", cluster_size=4096, compat="0.10")
    uqtest.qemu_io("qcow2", path, ["write -P 0x5a 0 12k", "write -P 0xa5 8M 4k"])
    uqtest.qemu_img("snapshot", "-c", "s1", path)
    uqtest.qemu_io("qcow2", path, ["write -P 0x66 4k 4k"])


def make_extl2(path):
    uqtest.qemu_create(path, "16M", cluster_size=65536, extended_l2="on")
    uqtest.qemu_io("qcow2", path, ["write -P 0x5a 0 8k", "write -z 64k 64k",
                                   "write -P 0x33 1M 64k"])


# ---- mutations --------------------------------------------------------------

def field(name, value):
    def m(img):
        v = value(img) if callable(value) else value
        img.set_field(name, v)
    return m


def fsize(img):
    return os.path.getsize(img.path)


def snap_entries(img):
    """[(offset, id_len, name_len, extra_len, l1_off, l1_size)] of the table."""
    out = []
    off = img.h["snapshots_offset"]
    for _ in range(img.h["nb_snapshots"]):
        b = img.pread(off, 40)
        l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", b, 0)
        extra = struct.unpack_from(">I", b, 36)[0]
        out.append((off, id_len, name_len, extra, l1_off, l1_size))
        off += 40 + extra + id_len + name_len
        off = (off + 7) & ~7
    return out


def snap_poke(fmt, rel, value):
    def m(img):
        off = snap_entries(img)[0][0]
        v = value(img) if callable(value) else value
        img.pwrite(off + rel, struct.pack(fmt, v))
    return m


def l1_poke(value):
    def m(img):
        v = value(img, img.l1()[0])
        img.set_u64(img.l1_entry_off(0), v)
    return m


def l2_poke(guest, value):
    def m(img):
        off = img.l2_entry_off(guest)
        img.set_u64(off, value(img, img.u64(off)))
    return m


def rt_poke(value):
    def m(img):
        off = img.h["refcount_table_offset"]
        img.set_u64(off, value(img, img.u64(off)))
    return m


def refcount_of(host_fn, value):
    def m(img):
        img.set_refcount(host_fn(img), value)
    return m


def ext_add(etype, data, length=None):
    """Append an extension (its length field may lie)."""
    def m(img):
        exts = img.extensions()
        img.set_extensions(exts + [(etype, data)])
        if length is not None:
            off = img.h["header_length"]
            for t, d in exts:
                off += 8 + ((len(d) + 7) & ~7)
            img.pwrite(off + 4, struct.pack(">I", length))
    return m


def backing(off, size, name=None):
    def m(img):
        o = off(img) if callable(off) else off
        if name is not None:
            img.pwrite(o, name(img) if callable(name) else name)
        img.set_field("backing_file_offset", o)
        img.set_field("backing_file_size", size if size is not None else len(name(img)))
    return m


def data_host(img, guest=0):
    return img.u64(img.l2_entry_off(guest)) & OFFSET_MASK


def l2_host(img):
    return img.l1()[0] & OFFSET_MASK


V3 = {
    # header fields
    "version-1": field("version", 1),
    "cluster-bits-0": field("cluster_bits", 0),
    "cluster-bits-31": field("cluster_bits", 31),
    "cluster-bits-12": field("cluster_bits", 12),
    "size-0": field("size", 0),
    "size-1": field("size", 1),
    "size-odd": field("size", (64 << 20) - 7),
    "size-2^62+1": field("size", (1 << 62) + 1),
    "size-past-l1": field("size", 1 << 40),
    "l1-size-0": field("l1_size", 0),
    "l1-size-past-eof": field("l1_size", 1 << 20),
    "l1-offset-0": field("l1_table_offset", 0),
    "l1-offset-8": field("l1_table_offset", 8),
    "l1-offset-wrap": field("l1_table_offset", (1 << 64) - 65536),
    "l1-on-reftable": field("l1_table_offset", lambda i: i.h["refcount_table_offset"]),
    "rt-offset-0": field("refcount_table_offset", 0),
    "rt-offset-wrap": field("refcount_table_offset", (1 << 64) - 65536),
    "rt-on-l1": field("refcount_table_offset", lambda i: i.h["l1_table_offset"]),
    "rt-clusters-0": field("refcount_table_clusters", 0),
    "rt-clusters-past-eof": field("refcount_table_clusters", 1 << 10),
    "refcount-order-0": field("refcount_order", 0),
    "refcount-order-3": field("refcount_order", 3),
    "refcount-order-6": field("refcount_order", 6),
    "refcount-order-max": field("refcount_order", 0xFFFFFFFF),
    "nb-snapshots-0": field("nb_snapshots", 0),
    "nb-snapshots-2": field("nb_snapshots", 2),
    "snapshots-offset-0": field("snapshots_offset", 0),
    "snapshots-offset-8": field("snapshots_offset", lambda i: i.h["snapshots_offset"] + 8),
    "snapshots-offset-wrap": field("snapshots_offset", (1 << 64) - 65536),
    "incompat-dirty": field("incompatible", 1),
    "incompat-corrupt": field("incompatible", 2),
    "incompat-data-file": field("incompatible", 4),
    "incompat-compression": field("incompatible", 8),
    "incompat-extl2": field("incompatible", 16),
    "incompat-bit63": field("incompatible", 1 << 63),
    "compat-lazy": field("compatible", 1),
    "compat-unknown": field("compatible", 1 << 40),
    "autoclear-bitmaps": field("autoclear", 1),
    "autoclear-raw": field("autoclear", 2),
    "autoclear-unknown": field("autoclear", 1 << 40),
    "header-length-0": field("header_length", 0),
    "header-length-101": field("header_length", 101),
    "header-length-112": field("header_length", 112),
    "header-length-cluster": field("header_length", 65536 + 8),
    "crypt-aes": field("crypt_method", 1),
    "crypt-3": field("crypt_method", 3),
    # header extensions
    "ext-unknown-huge": ext_add(0x12345678, b"x" * 8, 0xFFFFFFF8),
    "ext-backing-fmt-17": ext_add(0xE2792ACA, b"q" * 17),
    "ext-backing-fmt-bogus": ext_add(0xE2792ACA, b"bogus"),
    "ext-crypto-15": ext_add(0x0537BE77, b"\0" * 15),
    "ext-crypto-no-luks": ext_add(0x0537BE77, struct.pack(">QQ", 1 << 40, 4096)),
    "ext-features-odd": ext_add(0x6803F857, b"\0" * 47),
    "ext-bitmaps-garbage": ext_add(0x23852875, b"\xff" * 24),
    "ext-data-file-empty": ext_add(0x44415441, b""),
    "ext-data-file-missing": ext_add(0x44415441, b"/nonexistent/uq-data"),
    # backing file name
    "backing-offset-wrap": backing((1 << 64) - 64, 100),
    "backing-offset-in-header": backing(8, 16),
    "backing-size-0": backing(1024, 0),
    "backing-size-1024": backing(1024, 1024, b"a" * 1024),
    "backing-size-huge": backing(1024, 0xFFFFFFFF),
    "backing-missing": backing(1024, None, lambda i: b"/nonexistent/uq-backing.qcow2"),
    "backing-self": backing(1024, None, lambda i: os.path.basename(i.path).encode()),
    # L1 / L2 entries
    "l1-entry-reserved-bits": l1_poke(lambda i, e: e | (1 << 56) | 0x100),
    "l1-entry-to-header": l1_poke(lambda i, e: COPIED | 0),
    "l1-entry-to-l1": l1_poke(lambda i, e: COPIED | i.h["l1_table_offset"]),
    "l1-entry-to-reftable": l1_poke(lambda i, e: COPIED | i.h["refcount_table_offset"]),
    "l1-entry-no-copied": l1_poke(lambda i, e: e & ~COPIED),
    "l2-entry-reserved-bits": l2_poke(0, lambda i, e: e | (1 << 57)),
    "l2-entry-low-bits": l2_poke(0, lambda i, e: e | 0x100),
    "l2-entry-past-eof": l2_poke(0, lambda i, e: COPIED | ((fsize(i) + (1 << 30)) & ~0xFFFF)),
    "l2-entry-to-header": l2_poke(0, lambda i, e: COPIED | 0x10000 * 0),
    "l2-entry-to-l1": l2_poke(0, lambda i, e: COPIED | i.h["l1_table_offset"]),
    "l2-entry-to-own-l2": l2_poke(0, lambda i, e: COPIED | l2_host(i)),
    "l2-entry-zero-with-offset": l2_poke(0, lambda i, e: e | 1),
    "l2-entry-zero-copied-only": l2_poke(1 << 20, lambda i, e: COPIED),
    "l2-compressed-zero-flag": l2_poke(8 << 20, lambda i, e: e | 1),
    "l2-compressed-sectors-max": l2_poke(8 << 20, lambda i, e: e | (((1 << 13) - 1) << 49)),
    "l2-compressed-into-header": l2_poke(8 << 20, lambda i, e: COMPRESSED | 16),
    "l2-compressed-copied": l2_poke(8 << 20, lambda i, e: e | COPIED),
    "l2-compressed-garbage": l2_poke(8 << 20, lambda i, e: COMPRESSED | data_host(i, 0)),
    "l2-copied-cleared": l2_poke(32 << 20, lambda i, e: e & ~COPIED),
    # refcounts
    "rt-entry-unaligned": rt_poke(lambda i, e: e + 512),
    "rt-entry-0": rt_poke(lambda i, e: 0),
    "rt-entry-to-header": rt_poke(lambda i, e: 0x10000 * 0 + 0),
    "rt-entry-reserved": rt_poke(lambda i, e: e | 0x100),
    "refcount-header-0": refcount_of(lambda i: 0, 0),
    "refcount-l1-0": refcount_of(lambda i: i.h["l1_table_offset"], 0),
    "refcount-shared-data-1": refcount_of(lambda i: data_host(i, 128 << 10), 1),
    "refcount-data-max": refcount_of(lambda i: data_host(i, 32 << 20), 0xFFFF),
    "refcount-free-nonzero": refcount_of(lambda i: fsize(i) + (1 << 20), 1),
    "refcount-compressed-0": refcount_of(
        lambda i: i.u64(i.l2_entry_off(8 << 20)) & ((1 << 54) - 1) & ~0xFFFF, 0),
    # snapshot entries
    "snap-id-len-huge": snap_poke(">H", 12, 0xFFFF),
    "snap-name-len-huge": snap_poke(">H", 14, 0xFFFF),
    "snap-extra-huge": snap_poke(">I", 36, 0xFFFFFFF0),
    "snap-extra-0": snap_poke(">I", 36, 0),
    "snap-extra-8": snap_poke(">I", 36, 8),
    "snap-l1-size-huge": snap_poke(">I", 8, 0x7FFFFFFF),
    "snap-l1-size-0": snap_poke(">I", 8, 0),
    "snap-l1-unaligned": snap_poke(">Q", 0, lambda i: snap_entries(i)[0][4] + 8),
    "snap-l1-past-eof": snap_poke(">Q", 0, lambda i: (fsize(i) + (1 << 30)) & ~0xFFFF),
    "snap-l1-to-header": snap_poke(">Q", 0, 0),
    "snap-vmstate-huge": snap_poke(">I", 32, 0xFFFFFFFF),
}

V2 = {
    "v2-zero-flag": l2_poke(0, lambda i, e: e | 1),
    "v2-zero-flag-only": l2_poke(1 << 20, lambda i, e: 1),
    "v2-extension-garbage": lambda i: i.pwrite(72, struct.pack(">II", 0x12345678, 0x7FFFFFF0)),
    "v2-l1-size-0": field("l1_size", 0),
    "v2-refcount-0": refcount_of(lambda i: data_host(i, 0), 0),
    "v2-snap-extra-huge": snap_poke(">I", 36, 0xFFFFFFF0),
    "v2-snap-extra-0": snap_poke(">I", 36, 0),
    "v2-compat-tail": lambda i: i.pwrite(72, b"\xff" * 32),
}


def bitmap_poke(guest, value, entry=lambda e: e):
    """Extended L2 (64 KiB clusters): the entry of @guest and the bitmap
    word after it."""
    def m(img):
        at = (img.u64(img.h["l1_table_offset"]) & OFFSET_MASK) + 16 * (guest >> 16)
        img.set_u64(at, entry(img.u64(at)))
        img.set_u64(at + 8, value(img.u64(at + 8)))
    return m


EXTL2 = {
    "extl2-alloc-and-zero": bitmap_poke(0, lambda b: b | (1 << 32)),
    "extl2-alloc-without-cluster": bitmap_poke(2 << 20, lambda b: 1),
    "extl2-zero-bits-on-data": bitmap_poke(1 << 20, lambda b: 0xFFFFFFFF00000000),
    "extl2-flag-bit0": bitmap_poke(0, lambda b: b, entry=lambda e: e | 1),
}


def make_hole(path):
    """Two L2 tables (guest 0 and 512M) with a free cluster below the
    second: the data cluster of guest 0, discarded."""
    uqtest.qemu_create(path, "1G", cluster_size=65536)
    uqtest.qemu_io("qcow2", path, ["write -P 0x5a 0 64k", "write -P 0x33 600M 64k",
                                   "discard 0 64k"])


def l2_refcount_0(img):
    """The second L2 table: refcount 0 and no COPIED flag in L1. A write
    copies it into the hole below (not onto itself) and must not free it."""
    e = img.l1()[1]
    img.set_u64(img.l1_entry_off(1), e & ~COPIED)
    Image(img.path).set_refcount(e & OFFSET_MASK, 0)


HOLE = {
    "hole-l2-refcount-0": l2_refcount_0,
}


# ---- running ------------------------------------------------------------------

def ours(*args):
    return uqtest.uq(*args, check=False, timeout=TIMEOUT, input="")


def qemu(*args):
    return uqtest.run(list(args), check=False, timeout=TIMEOUT * 3, input="")


def crashed(p):
    return (p.returncode < 0 or p.returncode >= 128 or "Sanitizer" in p.stderr
            or "runtime error" in p.stderr)


def one_line(p, img):
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    if len(lines) != 1:
        return f"{len(lines)} lines on stderr:\n{uqtest.tail(p.stderr, 6)}"
    if os.path.basename(img) not in lines[0]:
        return f"the error does not name the file: {lines[0]!r}"
    return None


def check_json(p):
    try:
        r = json.loads(p.stdout)
    except ValueError:
        return None
    return {k: r.get(k, 0) for k in ("corruptions", "leaks")}


# Commands run on the image itself (must leave it as it was); the others
# run on copies.
READ_ONLY = ("info", "info-json", "check", "map", "snapshot-l", "io-read-ro", "convert")
COMMANDS = READ_ONLY + ("io-read", "check-r-leaks", "check-r-all", "io-write")
# Commands whose failure is a refusal (exit 1) whatever qemu's exit code.
PASS_FAIL = ("map", "snapshot-l", "io-read-ro", "io-read", "convert", "io-write")

# io-write: one sequence of writes that hit what the mutations patch (the
# data shared with the snapshot, the compressed and zero clusters, the
# clusters the L2/refcount pokes name) and allocate where nothing was
# written; partial clusters, so that COW reads the patched cluster too.
WRITES = {
    "v3": ["write -P 0x6b 0 4k", "write -P 0x6b 68k 4k", "write -P 0x6b 8M 4k",
           "write -P 0x6b 16M 4k", "write -P 0x6b 32M 4k", "write -P 0x6b 40M 4k",
           "write -P 0x6b 1M 4k", "write -P 0x6b 48M 64k"],
    "v2": ["write -P 0x6b 512 1k", "write -P 0x6b 4k 4k", "write -P 0x6b 8M 4k",
           "write -P 0x6b 1M 4k", "write -P 0x6b 12M 8k"],
    "extl2": ["write -P 0x6b 0 4k", "write -P 0x6b 64k 4k", "write -P 0x6b 1M 2k",
              "write -P 0x6b 2M 4k", "write -P 0x6b 8M 64k"],
    "hole": ["write -P 0x6b 601M 64k", "write -P 0x6b 600M 4k", "write -P 0x6b 4k 4k"],
}


def io_args(kind, prefix):
    return [a for c in WRITES[kind] for a in (prefix, c)]


def our_cmd(cmd, img, out, kind="v3"):
    if cmd == "io-write":
        return ["io", "-f", "qcow2", img] + io_args(kind, "-c")
    return {
        "info": ["info", "-f", "qcow2", img],
        "info-json": ["info", "-f", "qcow2", "--output=json", img],
        "check": ["check", "-f", "qcow2", "--output=json", img],
        "map": ["map", "-f", "qcow2", img],
        "snapshot-l": ["snapshot", "-l", img],
        "io-read-ro": ["io", "-r", "-f", "qcow2", img, "-c", "read 0 64k"],
        "io-read": ["io", "-f", "qcow2", img, "-c", "read 0 64k"],
        "convert": ["convert", "-f", "qcow2", "-O", "raw", img, out],
        "check-r-leaks": ["check", "-r", "leaks", "-f", "qcow2", img],
        "check-r-all": ["check", "-r", "all", "-f", "qcow2", img],
    }[cmd]


def qemu_cmd(cmd, img, out, kind="v3"):
    if cmd == "io-write":
        return ["qemu-io", "-f", "qcow2"] + io_args(kind, "-c") + [img]
    if cmd.startswith("io-"):
        return ["qemu-io"] + (["-r"] if cmd == "io-read-ro" else []) + [
            "-f", "qcow2", "-c", "read 0 64k", img]
    return ["qemu-img"] + our_cmd(cmd, img, out)


def qemu_outcome(cmd, p):
    """qemu's exit code; qemu-io exits 0 when a command fails, so a failure
    it prints counts as exit 1."""
    if cmd == "io-write":
        # it reports a failed free and goes on: only a failed write counts
        return 1 if p.returncode or "write failed" in p.stdout + p.stderr else 0
    if cmd.startswith("io-") and p.returncode == 0 and (
            "failed" in p.stdout + p.stderr or "rror" in p.stderr):
        return 1
    return p.returncode


def judge(cmd, p, img, expect):
    """None if our process @p meets @expect, an exit code (1 = a refusal:
    exactly one stderr line naming the file)."""
    rc = p.returncode
    if crashed(p):
        return f"{cmd}: crashed (exit {rc}):\n{uqtest.tail(p.stderr, 10)}"
    if rc != expect:
        return f"{cmd}: exit {rc}, expected {expect}: {p.stderr.strip()[:300]!r}"
    if cmd.startswith("check") and rc == 1 and any(
            l.strip() and not l.startswith(("ERROR", "Leaked", "Repairing", "Rebuilding",
                                            "Can't get refcount", "The following", "Widen"))
            for l in p.stderr.splitlines()[:-1]):
        return f"{cmd}: more than a report and an error line:\n{uqtest.tail(p.stderr, 6)}"
    if cmd.startswith("check") and rc == 1:
        last = p.stderr.strip().splitlines()[-1:] or [""]
        if os.path.basename(img) not in last[0]:
            return f"{cmd}: the last line does not name the file: {last[0]!r}"
    elif rc != 0 and cmd == "io-write":
        # one line per failed write (io goes on with the next, as qemu-io)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        bad = [l for l in lines if os.path.basename(img) not in l]
        if not lines or bad:
            return f"{cmd}: lines that do not name the file: {bad[:3]!r}"
    elif rc != 0 and not cmd.startswith("check"):
        e = one_line(p, img)
        if e:
            return f"{cmd}: {e}"
    return None


def corrupt_bit(path):
    with open(path, "rb") as f:
        f.seek(72)
        return int.from_bytes(f.read(8), "big") & CORRUPT_BIT


def check_counts(path):
    """qemu-img check's corruptions and leaks for @path; None when it gives
    no report (it cannot even check the image)."""
    return check_json(qemu("qemu-img", "check", "--output=json", "-f", "qcow2", path))


def worse(ours_, base):
    """What qemu-img check finds in our image beyond @base, or None."""
    if ours_ is None:
        return None if base is None else "qemu-img check cannot check it"
    if base is None:
        return None
    more = {k: v for k, v in ours_.items() if v > base[k]}
    return f"qemu-img check finds {ours_}, beyond {base}" if more else None


def judge_write(name, p, work, q, pristine_counts):
    """io-write against qemu-io on the same bytes (q: qemu's outcome)."""
    errs = []
    qrc, qp, qwork = q
    allowed, same_data = WRITE_ALLOWED.get(name, (None, True))
    if qrc == 0 and p.returncode == 0 and same_data:
        qraw, uraw = qwork + ".raw", work + ".raw"
        for f, out in ((qwork, qraw), (work, uraw)):
            c = qemu("qemu-img", "convert", "-f", "qcow2", "-O", "raw", f, out)
            if c.returncode:
                errs.append(f"io-write: qemu-img convert {os.path.basename(f)}: "
                            f"{c.stderr.strip()[:200]}")
        if not errs:
            diff = uqtest.first_difference(qraw, uraw)
            if diff:
                errs.append(f"io-write: data differs from qemu-io's: {diff}")
    # Ours must be no worse than qemu's result, or than the mutation itself
    # where qemu's write failed midway; a failed write may leak clusters
    # (qemu's do too), never corrupt more.
    base = check_counts(qwork)
    if qrc and pristine_counts is not None:
        base = {k: max(base[k], pristine_counts[k]) for k in base} if base else pristine_counts
    if qrc and base:
        base["leaks"] = 1 << 62
    e = worse(check_counts(work), allowed or base)
    if e:
        errs.append(f"io-write: {e}")
    return errs


def sweep_one(d, src, name, mutate, kind="v3"):
    img = os.path.join(d, f"{name}.qcow2")
    shutil.copyfile(src, img)
    mutate(Image(img))
    with open(img, "rb") as f:
        pristine = f.read()
    errs = []
    qout, uout = img + ".q.raw", img + ".u.raw"
    q = {}
    for cmd in COMMANDS:
        work = img if cmd in READ_ONLY else img + f".{cmd}.q"
        if cmd != "info" and (cmd == "info-json" or q["info"][0] or name in QEMU_HANGS):
            q[cmd] = q["info"] if cmd == "info-json" else None
            continue
        if work != img:
            shutil.copyfile(img, work)
        qp = qemu(*qemu_cmd(cmd, work, qout, kind))
        qrc = qemu_outcome(cmd, qp)
        if cmd == "io-write" and corrupt_bit(work) and not corrupt_bit(img):
            qrc = 1
        q[cmd] = (qrc, qp, work)
        if cmd == "convert" and qp.returncode == 0:
            os.rename(qout, qout + ".keep")
    qemu_opens = q["info"][0] == 0
    for cmd in COMMANDS:
        work = img if cmd in READ_ONLY else img + f".{cmd}.u"
        if work != img:
            shutil.copyfile(img, work)
        if os.path.exists(uout):
            os.unlink(uout)
        p = ours(*our_cmd(cmd, work, uout, kind))
        if not qemu_opens:
            expect = 1
        elif (name, cmd) in DEVIATIONS:
            expect = DEVIATIONS[(name, cmd)]
        elif (name, "*") in DEVIATIONS:
            expect = DEVIATIONS[(name, "*")]
        elif q[cmd] is None:
            errs.append(f"{cmd}: qemu hangs here and no expectation is listed")
            continue
        else:
            expect = 0 if cmd in ("info", "info-json") else q[cmd][0]
            if cmd in PASS_FAIL and expect:
                expect = 1
        e = judge(cmd, p, img, expect)
        if e:
            if q[cmd] and q[cmd][0] != 0:
                e += f"\n  (qemu: {q[cmd][1].stderr.strip()[:200]})"
            errs.append(e)
        with open(work, "rb") as f:
            now = f.read()
        if cmd in READ_ONLY and now != pristine:
            errs.append(f"{cmd} changed the file")
            with open(img, "wb") as f:
                f.write(pristine)
        elif cmd == "io-read" and now != pristine:
            # qemu-io's read-write open sets the corrupt bit, repairs a
            # dirty image, clears autoclear bits: we may change what it
            # does, or set the corrupt bit and clear autoclear bits we do
            # not support (the bitmaps bit: qemu keeps that one)
            with open(q[cmd][2], "rb") as f:
                theirs = f.read()
            u64 = lambda b, o: int.from_bytes(b[o:o + 8], "big")
            if now != theirs and not (
                    len(now) == len(pristine) and now[:72] == pristine[:72]
                    and now[96:] == pristine[96:] and now[80:88] == pristine[80:88]
                    and u64(now, 72) in (u64(pristine, 72), u64(pristine, 72) | CORRUPT_BIT)
                    and not u64(now, 88) & ~u64(pristine, 88)):
                errs.append("io read (read-write) changed the file, and not as qemu-io does")
        if cmd == "io-write" and qemu_opens and q[cmd] and not crashed(p):
            errs += judge_write(name, p, work, q[cmd],
                                check_json(q["check"][1]) if q["check"] else None)
        if cmd == "check" and q[cmd] and p.returncode in (0, 2, 3) and \
                q[cmd][0] == p.returncode and check_json(q[cmd][1]) != check_json(p):
            errs.append(f"check counts {check_json(p)}, qemu-img {check_json(q[cmd][1])}")
        if cmd == "convert" and p.returncode == 0 and q[cmd] and q[cmd][0] == 0:
            diff = uqtest.first_difference(qout + ".keep", uout)
            if diff:
                errs.append(f"convert -O raw differs from qemu-img's: {diff}")
        if cmd == "check-r-all" and p.returncode == 0:
            bad = uqtest.qemu_check_clean("after our check -r all", "-f", "qcow2", work)
            if bad:
                errs.append(bad)
            if q[cmd] and q[cmd][0] == 0:
                # exit 0 identical, 1 different, 2 cannot read (both, when
                # the repair left an unreadable compressed cluster)
                pc = qemu("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2",
                          q[cmd][2], work)
                if pc.returncode == 1:
                    errs.append("data after check -r all differs from qemu-img's repair")
                elif pc.returncode and subprocess.run(
                        ["qemu-img", "convert", "-O", "raw", q[cmd][2], os.devnull],
                        capture_output=True).returncode == 0:
                    errs.append(f"our repaired image cannot be read: {pc.stderr.strip()}")
    for f in os.listdir(d):
        if f.startswith(name + ".qcow2"):
            os.unlink(os.path.join(d, f))
    return errs


# qemu-img opens these and we do otherwise: (case, command) -> our exit code
# ("*": every command; 1 is a one-line refusal).
DEVIATIONS = {
    # Stricter on purpose: tables past the end of the file, or a backing
    # file name read from the header fields themselves, are refused at open
    # (test_bad_input: l1-beyond-eof); reads through an L1 table that is the
    # header fail as corrupt instead of reading zeros past EOF.
    ("l1-size-past-eof", "*"): 1,
    ("backing-offset-in-header", "*"): 1,
    ("l1-offset-0", "map"): 1, ("l1-offset-0", "io-read-ro"): 1,
    ("l1-offset-0", "convert"): 1, ("l1-offset-0", "io-read"): 1,
    # Repairs that go further than qemu's (qemu-img check calls the result
    # clean: asserted above), or give up with the corruption left (exit 2)
    # where qemu stops with an error (exit 1).
    ("l1-entry-to-l1", "check-r-all"): 0, ("rt-entry-unaligned", "check-r-all"): 0,
    ("rt-entry-reserved", "check-r-all"): 0, ("rt-offset-0", "check-r-all"): 0,
    ("l1-entry-to-header", "check-r-all"): 2,
    # qemu's repair of a snapshot entry with an L1 table too large fails on
    # its own overlap check (exit 1); ours frees what only that snapshot
    # used, as qemu's tries to, and leaves the entry corrupt (exit 2).
    ("snap-l1-size-huge", "check-r-all"): 2,
    # io-write. qemu-io's write through an L1 entry that points at the
    # header trips an assertion (it crashes); ours allocates a table, and
    # qemu-img check finds no more than in the mutated image.
    ("l1-entry-to-header", "io-write"): 0,
    # The bitmaps autoclear bit without a bitmaps extension: qemu guards a
    # bitmap directory at offset 0 and marks the image corrupt at the first
    # write; we clear the bit (we keep no bitmaps) and write.
    ("autoclear-bitmaps", "io-write"): 0,
    # Stricter on purpose: a refcount table entry with reserved bits set
    # (qemu-img check calls it corrupt; qemu masks the bits and writes), and
    # a v2 L2 entry with the zero flag, which qemu's own read path calls
    # corrupt (its full-cluster write replaces the entry).
    ("rt-entry-reserved", "io-write"): 1,
    ("v2-zero-flag-only", "io-write"): 1,
}
# io-write cases where qemu-img check may find more in ours than in qemu's
# result: (the most it may find, whether the data must equal qemu-io's).
WRITE_ALLOWED = {
    # The data cluster of guest 0 has refcount 0: qemu's L2 copy lands on
    # it and overwrites the guest's data (qemu-img check: refcount 1,
    # references 3); ours keeps the data, and check reports the mutated
    # refcount twice (refcount 0, and a COPIED entry with refcount 0).
    "v2-refcount-0": ({"corruptions": 2, "leaks": 0}, False),
    # 64-bit refcounts read from 16-bit blocks: garbage (8203 errors before
    # the writes) in both; the same clusters get the same data, and the
    # entries we allocate carry COPIED where qemu-img check reads
    # refcount 0.
    "refcount-order-6": ({"corruptions": 8209, "leaks": 4}, True),
}
# qemu-img check, convert, map... never finish on these: only info is asked.
QEMU_HANGS = {"backing-self"}
DEVIATIONS.update({("backing-self", c): 1 for c in COMMANDS[2:]})


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    res = uqtest.Results("test_hostile_sweep")
    only = set(filter(None, os.environ.get("UQ_CASES", "").split(",")))
    d = uqtest.scratch_dir("hostile")
    try:
        srcs = {k: os.path.join(d, f"src-{k}.qcow2") for k in ("v3", "v2", "extl2", "hole")}
        make_v3(srcs["v3"])
        make_hole(srcs["hole"])
        make_v2(srcs["v2"])
        make_extl2(srcs["extl2"])
        jobs = []
        for kind, table in (("v3", V3), ("v2", V2), ("extl2", EXTL2), ("hole", HOLE)):
            if not only:
                jobs.append((f"{kind}-valid", srcs[kind], lambda i: None, kind))
            jobs += [(n, srcs[kind], m, kind) for n, m in table.items()
                     if not only or n in only]
        # The commands mostly wait on exec and the file system: four at a time.
        with ThreadPoolExecutor(4) as pool:
            futs = [(n, pool.submit(sweep_one, d, src, n, m, k)) for n, src, m, k in jobs]
            for n, fut in futs:
                res.case(n, lambda: "\n".join(fut.result()) or None)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
