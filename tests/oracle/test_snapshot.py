#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Internal snapshots against qemu-img.

- Snapshots we create are listed by `qemu-img snapshot -l` and read back by
  `qemu-img convert -l snapshot.name=...` as the content written before
  them; writes afterwards copy on write: the snapshot stays as it was and
  the active state matches a raw mirror written by qemu-io with the same
  commands. Apply and delete by us, then qemu-img check is clean (no
  errors, no leaks) after every operation; over several cluster sizes and
  refcount widths, and over compressed clusters.
- Snapshots qemu-img made are listed (same text as qemu-img's), read
  (`convert -s`, the engine's read-only snapshot open), applied and
  deleted by us, byte for byte.
- `info` prints the snapshot list as qemu-img info does (text and JSON).
- Refcounts too narrow for a snapshot (refcount_bits=1, or 2 with
  snapshots stacked): a clean refusal, image unchanged (qemu-img itself
  fails there and leaks a cluster).
- Bad input: a snapshot table outside the file, entries running past its
  end, an unaligned snapshot L1 table, too much extra data, an unknown
  snapshot, a duplicate name: one error line, exit 1, image unchanged.
"""

import json
import os
import shutil
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import uqtest as t  # noqa: E402

SIZE = 64 << 20
# Writes before the first snapshot, then after it (each a qemu-io command).
FIRST = ["write -P 0x11 0 1M", "write -P 0x22 10M 100k", "write -P 0x33 33M 3k",
         "write -P 0x44 63M 1M"]
AFTER1 = ["write -P 0x55 512k 1M", "write -z 10M 64k", "write -P 0x66 33M 1k",
          "write -P 0x77 40M 8k"]
AFTER2 = ["write -P 0x88 0 4k", "write -z 63M 512k", "write -P 0x99 20M 2M"]


def raw_of(img, out, snapshot=None):
    args = ["convert", "-O", "raw"]
    if snapshot:
        args += ["-l", f"snapshot.name={snapshot}"]
    t.qemu_img(*args, img, out)
    return out


def same(a, b, what):
    diff = t.first_difference(a, b)
    assert diff is None, f"{what}: {diff}"


def check_clean(img, what):
    p = t.qemu_img("check", "--output=json", img, check=False)
    assert p.returncode == 0, f"qemu-img check after {what} exits {p.returncode}:\n{p.stdout}"
    r = json.loads(p.stdout)
    bad = {k: r.get(k, 0) for k in ("corruptions", "leaks", "check-errors")}
    assert not any(bad.values()), f"qemu-img check after {what}: {bad}"


def qemu_names(img):
    """(id, name) pairs as qemu-img info --output=json lists them."""
    info = json.loads(t.qemu_img("info", "--output=json", img).stdout)
    return [(s["id"], s["name"]) for s in info.get("snapshots", [])]


def mirror(raw, cmds):
    t.qemu_io("raw", raw, cmds)


def io_cmds(cmds):
    out = []
    for c in cmds:
        out += ["-c", c]
    return out


def ours_then_qemu(d, cluster, refbits, compat="1.1"):
    """Snapshots made, applied and deleted by us; qemu-img is the judge."""
    img = os.path.join(d, f"o{cluster}-{refbits}.qcow2")
    t.qemu_create(img, SIZE, cluster_size=cluster, refcount_bits=refbits, compat=compat)
    t.qemu_io("qcow2", img, FIRST)
    r0 = raw_of(img, os.path.join(d, "r0.raw"))
    m = os.path.join(d, "mirror.raw")
    shutil.copyfile(r0, m)

    t.uq("snapshot", "-c", "s1", img)
    check_clean(img, "snapshot -c s1")
    assert qemu_names(img) == [("1", "s1")], f"qemu-img lists {qemu_names(img)}"
    same(raw_of(img, os.path.join(d, "s.raw"), "s1"), r0, "s1 right after -c")

    # Copy on write: the active state changes, s1 does not.
    t.uq("io", img, *io_cmds(AFTER1))
    mirror(m, AFTER1)
    check_clean(img, "writes after s1")
    same(raw_of(img, os.path.join(d, "a.raw")), m, "active after writes")
    same(raw_of(img, os.path.join(d, "s.raw"), "s1"), r0, "s1 after writes")
    r1 = os.path.join(d, "r1.raw")
    shutil.copyfile(m, r1)

    t.uq("snapshot", "-c", "s2", img)
    check_clean(img, "snapshot -c s2")
    assert qemu_names(img) == [("1", "s1"), ("2", "s2")], f"qemu-img lists {qemu_names(img)}"
    t.uq("io", img, *io_cmds(AFTER2))
    mirror(m, AFTER2)
    check_clean(img, "writes after s2")
    same(raw_of(img, os.path.join(d, "a.raw")), m, "active after more writes")
    same(raw_of(img, os.path.join(d, "s.raw"), "s2"), r1, "s2 after writes")

    # The engine's read-only snapshot open, through convert -s / -l.
    ours = os.path.join(d, "ours.raw")
    t.uq("convert", "-s", "s1", img, ours)
    same(ours, r0, "our convert -s s1")
    t.uq("convert", "-l", "snapshot.name=s2", img, ours)
    same(ours, r1, "our convert -l snapshot.name=s2")
    t.uq("convert", "-s", "2", img, ours)
    same(ours, r1, "our convert -s 2 (by id)")

    # Apply s1 (by id), then delete both; the active state stays s1's.
    t.uq("snapshot", "-a", "1", img)
    check_clean(img, "snapshot -a 1")
    same(raw_of(img, os.path.join(d, "a.raw")), r0, "active after -a s1")
    same(raw_of(img, os.path.join(d, "s.raw"), "s2"), r1, "s2 after -a s1")
    t.uq("snapshot", "-d", "s1", img)
    check_clean(img, "snapshot -d s1")
    assert qemu_names(img) == [("2", "s2")], f"qemu-img lists {qemu_names(img)}"
    same(raw_of(img, os.path.join(d, "s.raw"), "s2"), r1, "s2 after -d s1")
    t.uq("snapshot", "-c", "s3", img)
    assert qemu_names(img) == [("2", "s2"), ("3", "s3")], \
        f"new id is not max + 1: {qemu_names(img)}"
    t.uq("snapshot", "-d", "s2", img)
    t.uq("snapshot", "-d", "3", img)
    check_clean(img, "deleting every snapshot")
    assert qemu_names(img) == [], f"qemu-img lists {qemu_names(img)}"
    same(raw_of(img, os.path.join(d, "a.raw")), r0, "active after deletes")

    # Nothing is shared any more (qemu-img check verified the COPIED flags).
    cmds = ["write -P 0xab 0 4k"] + AFTER2[1:]
    t.uq("io", img, *io_cmds(cmds))
    mirror(r0, cmds)
    check_clean(img, "writes with no snapshot left")
    same(raw_of(img, os.path.join(d, "a.raw")), r0, "active at the end")


def qemu_then_ours(d, cluster):
    """Snapshots made by qemu-img: listed, read, applied and deleted by us."""
    img = os.path.join(d, f"q{cluster}.qcow2")
    t.qemu_create(img, SIZE, cluster_size=cluster)
    t.qemu_io("qcow2", img, FIRST)
    t.qemu_img("snapshot", "-c", "first", img)
    r0 = raw_of(img, os.path.join(d, "qr0.raw"))
    t.qemu_io("qcow2", img, AFTER1)
    t.qemu_img("snapshot", "-c", "second one", img)
    r1 = raw_of(img, os.path.join(d, "qr1.raw"))
    t.qemu_io("qcow2", img, AFTER2)
    r2 = raw_of(img, os.path.join(d, "qr2.raw"))

    q = t.qemu_img("snapshot", "-l", img).stdout
    o = t.uq("snapshot", "-l", img).stdout
    assert q == o, f"snapshot -l differs:\nqemu-img:\n{q}ours:\n{o}"
    for args in ([], ["--output=json"]):
        q = t.qemu_img("info", *args, img).stdout
        o = t.uq("info", *args, img).stdout
        assert q == o, f"info {args} differs:\nqemu-img:\n{q}ours:\n{o}"

    ours = os.path.join(d, "ours.raw")
    t.uq("convert", "-s", "first", img, ours)
    same(ours, r0, "our read of qemu-img's snapshot 'first'")
    t.uq("convert", "-s", "second one", img, ours)
    same(ours, r1, "our read of qemu-img's snapshot 'second one'")

    t.uq("snapshot", "-a", "first", img)
    check_clean(img, "our -a of qemu-img's snapshot")
    same(raw_of(img, os.path.join(d, "a.raw")), r0, "active after -a first")
    t.uq("snapshot", "-a", "second one", img)
    check_clean(img, "our second -a")
    same(raw_of(img, os.path.join(d, "a.raw")), r1, "active after -a 'second one'")
    t.uq("snapshot", "-d", "first", img)
    check_clean(img, "our -d of qemu-img's snapshot")
    assert qemu_names(img) == [("2", "second one")], f"qemu-img lists {qemu_names(img)}"
    same(raw_of(img, os.path.join(d, "s.raw"), "second one"), r1, "snapshot after -d first")
    # qemu-img takes over again: it applies and deletes what is left.
    t.qemu_io("qcow2", img, ["write -P 0x5c 1M 1M"])
    t.qemu_img("snapshot", "-a", "second one", img)
    same(raw_of(img, os.path.join(d, "a.raw")), r1, "qemu-img -a after our edits")
    t.qemu_img("snapshot", "-d", "second one", img)
    check_clean(img, "qemu-img -d after our edits")
    del r2


def compressed(d):
    """Compressed clusters are shared and released by QEMU's rules."""
    src = os.path.join(d, "csrc.qcow2")
    img = os.path.join(d, "c.qcow2")
    t.qemu_create(src, SIZE, cluster_size=65536)
    t.qemu_io("qcow2", src, ["write -P 0x3c 0 2M", "write -P 0x4d 5M 300k"])
    t.qemu_img("convert", "-c", "-O", "qcow2", src, img)
    r0 = raw_of(img, os.path.join(d, "c0.raw"))
    m = os.path.join(d, "cm.raw")
    shutil.copyfile(r0, m)
    t.uq("snapshot", "-c", "c", img)
    check_clean(img, "snapshot of compressed clusters")
    cmds = ["write -P 0x5e 100k 8k", "write -z 5M 64k", "write -P 0x6f 1M 1M"]
    t.uq("io", img, *io_cmds(cmds))
    mirror(m, cmds)
    check_clean(img, "writes over shared compressed clusters")
    same(raw_of(img, os.path.join(d, "ca.raw")), m, "active over compressed")
    same(raw_of(img, os.path.join(d, "cs.raw"), "c"), r0, "compressed snapshot")
    t.uq("snapshot", "-a", "c", img)
    check_clean(img, "-a over compressed clusters")
    same(raw_of(img, os.path.join(d, "ca.raw")), r0, "active after -a c")
    t.uq("snapshot", "-d", "c", img)
    check_clean(img, "-d over compressed clusters")
    same(raw_of(img, os.path.join(d, "ca.raw")), r0, "active after -d c")


def read_table(img):
    """The snapshot table: [(header fields..., extra, id, name)] and its end."""
    with open(img, "rb") as f:
        data = f.read()
    nb, off = struct.unpack(">IQ", data[60:72])
    out, pos = [], off
    for _ in range(nb):
        pos = (pos + 7) & ~7
        h = struct.unpack(">QIHHIIQII", data[pos:pos + 40])
        extra = data[pos + 40:pos + 40 + h[8]]
        p = pos + 40 + h[8]
        out.append((h, extra, data[p:p + h[2]], data[p + h[2]:p + h[2] + h[3]]))
        pos = p + h[2] + h[3]
    return out


def extra_data(d):
    """Unknown extra data is kept verbatim; entries without the 64-bit VM
    state size, disk size or icount (older writers) read as QEMU reads them."""
    img = os.path.join(d, "x.qcow2")
    t.qemu_create(img, SIZE, cluster_size=65536)
    t.qemu_io("qcow2", img, FIRST)
    t.qemu_img("snapshot", "-c", "long", img)
    t.qemu_img("snapshot", "-c", "short", img)
    ents = read_table(img)
    # Rewrite the table at the end of the file: entry 1 with 8 unknown bytes
    # of extra data, entry 2 with none (vm_state_size 32-bit only).
    unknown = bytes(range(0xa0, 0xa8))
    table = b""
    for i, (h, extra, sid, name) in enumerate(ents):
        extra = extra + unknown if i == 0 else b""
        hh = list(h)
        hh[7] = 0x1234 if i == 1 else h[7]
        hh[8] = len(extra)
        table += b"\0" * (-len(table) % 8)
        table += struct.pack(">QIHHIIQII", *hh) + extra + sid + name
    end = (os.path.getsize(img) + 0xffff) & ~0xffff
    with open(img, "r+b") as f:
        f.seek(end)
        f.write(table + b"\0" * (-len(table) % 65536))
        f.seek(64)
        f.write(struct.pack(">Q", end))
    # The new table's refcount and the old one's leak: qemu-img repairs them.
    t.qemu_img("check", "-r", "all", img, check=False)
    check_clean(img, "hand-made table")
    q = t.qemu_img("snapshot", "-l", img).stdout
    o = t.uq("snapshot", "-l", img).stdout
    assert q == o, f"snapshot -l differs:\nqemu-img:\n{q}ours:\n{o}"
    q = t.qemu_img("info", "--output=json", img).stdout
    o = t.uq("info", "--output=json", img).stdout
    assert q == o, f"info --output=json differs:\nqemu-img:\n{q}ours:\n{o}"

    t.uq("snapshot", "-c", "third", img)
    check_clean(img, "our -c over a hand-made table")
    ents2 = read_table(img)
    assert len(ents2) == 3, f"{len(ents2)} entries"
    h, extra, sid, name = ents2[0]
    assert extra[24:] == unknown and h[8] == 32, f"unknown extra data not kept: {extra.hex()}"
    h, extra, sid, name = ents2[1]
    assert h[8] == 24 and h[7] == 0x1234, f"short entry written as {h}, extra {extra.hex()}"
    vm_large, disk, icount = struct.unpack(">QQQ", extra)
    assert (vm_large, disk, icount) == (0x1234, SIZE, (1 << 64) - 1), \
        f"short entry's extra data written as {(vm_large, disk, icount)}"
    assert (sid, name) == (b"2", b"short"), f"entry 2 is {sid}/{name}"
    q = t.qemu_img("snapshot", "-l", img).stdout
    o = t.uq("snapshot", "-l", img).stdout
    assert q == o, f"snapshot -l differs:\nqemu-img:\n{q}ours:\n{o}"


def refused(img, args, words):
    """Our command fails with one error line containing @words; image unchanged."""
    before = t.sha256(img)
    p = t.uq(*args, img, check=False)
    assert p.returncode == 1, f"{args} exits {p.returncode}: {p.stderr}"
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, f"{args}: expected one error line, got {p.stderr!r}"
    assert os.path.basename(img) in lines[0] and words in lines[0], \
        f"{args}: unclear error {lines[0]!r}"
    assert t.sha256(img) == before, f"{args} changed the image"


def narrow_refcounts(d):
    img = os.path.join(d, "r1.qcow2")
    t.qemu_create(img, 16 << 20, refcount_bits=1)
    t.qemu_io("qcow2", img, ["write -P 0x21 0 256k"])
    refused(img, ["snapshot", "-c", "s"], "refcount_bits=1")
    check_clean(img, "refused snapshot (refcount_bits=1)")
    # An empty image has nothing to share: that snapshot works (as in qemu-img).
    empty = os.path.join(d, "r1e.qcow2")
    t.qemu_create(empty, 16 << 20, refcount_bits=1)
    t.uq("snapshot", "-c", "s", empty)
    check_clean(empty, "snapshot of an empty refcount_bits=1 image")
    assert qemu_names(empty) == [("1", "s")]

    # refcount_bits=2: at most 3 references; a third snapshot would need 4.
    img = os.path.join(d, "r2.qcow2")
    t.qemu_create(img, 16 << 20, refcount_bits=2)
    t.qemu_io("qcow2", img, ["write -P 0x21 0 256k"])
    r0 = raw_of(img, os.path.join(d, "r2.raw"))
    t.uq("snapshot", "-c", "a", img)
    t.uq("snapshot", "-c", "b", img)
    check_clean(img, "two snapshots with refcount_bits=2")
    refused(img, ["snapshot", "-c", "c"], "refcount_bits=2")
    refused(img, ["snapshot", "-a", "a"], "refcount_bits=2")
    t.uq("snapshot", "-d", "a", img)
    t.uq("snapshot", "-a", "b", img)
    check_clean(img, "-d/-a with refcount_bits=2")
    same(raw_of(img, os.path.join(d, "r2a.raw")), r0, "refcount_bits=2 after -a")


def bad_tables(d):
    base = os.path.join(d, "good.qcow2")
    t.qemu_create(base, SIZE, cluster_size=65536)
    t.qemu_io("qcow2", base, FIRST)
    t.qemu_img("snapshot", "-c", "one", base)
    t.qemu_img("snapshot", "-c", "two", base)
    with open(base, "rb") as f:
        nb, off = struct.unpack(">IQ", f.read(72)[60:72])
    size = os.path.getsize(base)

    def patched(name, edits):
        p = os.path.join(d, name)
        shutil.copyfile(base, p)
        with open(p, "r+b") as f:
            for where, fmt, v in edits:
                f.seek(where)
                f.write(struct.pack(fmt, v))
        return p

    cases = [
        ("table-beyond-eof", [(64, ">Q", (size + (1 << 20)) & ~0xffff)], "snapshot table"),
        ("table-misaligned", [(64, ">Q", off + 8)], "snapshot table"),
        ("entries-past-eof", [(60, ">I", 4000)], "beyond the end of the file"),
        ("l1-misaligned", [(off, ">Q", 0x10200)], "L1 table offset"),
        ("l1-beyond-eof", [(off, ">Q", (size + (16 << 20)) & ~0xffff)], "L1 table offset"),
        ("extra-too-large", [(off + 36, ">I", 4096)], "extra data"),
    ]
    for name, edits, words in cases:
        p = patched(name + ".qcow2", edits)
        for args in (["snapshot", "-l"], ["snapshot", "-c", "new"], ["snapshot", "-d", "one"],
                     ["snapshot", "-a", "one"], ["convert", "-s", "one"], ["info"]):
            if args[0] == "convert":
                args = args + [p]
                before = t.sha256(p)
                q = t.uq(*args, os.path.join(d, "out.raw"), check=False)
                assert q.returncode == 1 and words in q.stderr, \
                    f"{name}: convert -s: exit {q.returncode}, {q.stderr!r}"
                assert t.sha256(p) == before, f"{name}: convert -s changed the image"
                continue
            if name.startswith("l1-") and args[0] in ("info", "snapshot") and args[1:] in ([], ["-l"]):
                # As qemu-img: listing needs no snapshot's L1 table.
                before = t.sha256(p)
                q = t.uq(*args, p, check=False)
                assert q.returncode == 0 and "one" in q.stdout, \
                    f"{name}: {args}: exit {q.returncode}, {q.stderr!r}"
                assert t.sha256(p) == before, f"{name}: {args} changed the image"
                continue
            try:
                refused(p, args, words)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}")

    # An unknown snapshot or a duplicate name, on a good image.
    p = patched("good2.qcow2", [])
    refused(p, ["snapshot", "-a", "three"], "not found")
    refused(p, ["snapshot", "-d", "three"], "not found")
    refused(p, ["snapshot", "-c", "two"], "already exists")
    q = t.uq("convert", "-s", "three", p, os.path.join(d, "out.raw"), check=False)
    assert q.returncode == 1 and "not found" in q.stderr, f"convert -s three: {q.stderr!r}"
    check_clean(p, "refused operations")
    del nb


def main():
    t.require_tools("qemu-img", "qemu-io")
    d = t.scratch_dir("snapshot")
    res = t.Results("test_snapshot")
    try:
        for cluster, refbits in ((65536, 16), (512, 16), (4096, 16), (2 << 20, 16),
                                 (65536, 8), (65536, 64), (4096, 64)):
            res.case(f"ours then qemu-img, cluster {cluster}, refcount_bits {refbits}",
                     ours_then_qemu, d, cluster, refbits)
        res.case("ours then qemu-img, compat 0.10", ours_then_qemu, d, 65536, 16, "0.10")
        res.case("extra data kept, short entries extended", extra_data, d)
        for cluster in (65536, 4096):
            res.case(f"qemu-img's snapshots used by us, cluster {cluster}",
                     qemu_then_ours, d, cluster)
        res.case("compressed clusters", compressed, d)
        res.case("refcounts too narrow", narrow_refcounts, d)
        res.case("bad snapshot tables and names", bad_tables, d)
    finally:
        t.cleanup(d)
    res.finish()


if __name__ == "__main__":
    main()
