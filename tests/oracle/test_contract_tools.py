#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Contract corners of create, info, map, check and convert that a hostile
tester found disagreeing with qemu-img (each case once failed):

  create-self-backing     `create -b X X`: qemu-img refuses an image that
                          names itself as backing file; so must we (exit 1,
                          one line, the existing file untouched), also under
                          another name (./X, a symlink), where qemu-img -F
                          writes an image that can never open.
  create-unsafe-no-fmt    `create -u -b B IMG SIZE` without -F: qemu-img
                          refuses (the format cannot be detected); so must we.
  create-data-file-fails  a data file that cannot be created fails the
                          create; the existing image stays as it was.
  raw-partial-sector      a raw file whose size is not a multiple of 512:
                          virtual size and map as qemu-img's (whole sectors,
                          the tail reads as zeros).
  map-data-file           human map of an image with an external data file
                          names the data file in the File column.
  convert-onto-source     convert whose target (or -o data_file) is a file
                          the source chain reads (the source itself, under
                          another name or a symlink, its backing file, its
                          data file): qemu-img's locks refuse it; we used to
                          truncate the source and exit 0.
  create-sizes            SIZE spellings as qemu-img takes them: fractions
                          with a unit ("1.1M", "2.7G": qemu-img drops what
                          falls below a byte), "1." and "1.k", a leading
                          '+' or blank; the same refusals ("1.5", "1.5b",
                          "-1M", "1.e3", "0x1.8M").
  check-backing-gone      check of an image whose backing file is missing:
                          qemu-img check cannot open it and exits 1; we
                          used to report a clean image (exit 0).
  create-option-lists     -o lists qemu-img refuses: an empty pair ("a=1,",
                          ",a=1", "=4k", ""), SIZE given twice (-o size and
                          SIZE), an empty backing file name; and -b/-F win
                          over -o backing_file/backing_fmt as in qemu-img.
  raw-actual-size         create -f raw (and convert -O raw) allocate the
                          first block as qemu-img's file driver does, so
                          info's actual-size agrees (it was 0 for ours).
  data-file-is-image      create -o data_file=IMG IMG is refused with IMG
                          untouched (it made an image whose guest writes
                          overwrite its own metadata); an image whose data
                          file is itself opens read-only (info, map, check,
                          convert, as qemu-img) but never for writing.
  map-encrypted           map of a LUKS image: no "offset" members (QEMU
                          gives no host offsets of encrypted data) and the
                          human map refuses, as qemu-img's.
  create-prealloc-backing preallocation with a backing file and without
                          extended_l2: qemu-img refuses (allocated clusters
                          would hide the backing data); so must we.
  info-bitmaps            persistent dirty bitmaps (qemu-img bitmap --add,
                          enabled, disabled, in use) listed by info, human
                          and JSON, as qemu-img lists them; none listed
                          where the autoclear bit says they are stale.
"""

import json
import os
import struct
import sys

import uqtest


def one_line_error(p, name, what):
    lines = p.stderr.strip().splitlines()
    if p.returncode == 0:
        return f"{what}: exit 0, expected an error"
    if len(lines) != 1 or name not in lines[0]:
        return f"{what}: expected one error line naming {name}, got {p.stderr!r}"
    return None


def refused_untouched(d, args, what):
    """qemu-img and we must both refuse `create @args` on an existing
    image, and ours must stay byte for byte as it was."""
    for who, run in (("qemu-img", uqtest.qemu_img), ("ours", uqtest.uq)):
        img = os.path.join(d, "img.qcow2")
        uqtest.qemu_create(img, "1M")
        before = uqtest.sha256(img)
        p = run("create", "-f", "qcow2", *args, cwd=d, check=False)
        if who == "qemu-img":
            if p.returncode == 0:
                return f"{what}: qemu-img accepts it; the case is wrong"
            continue
        err = one_line_error(p, "img.qcow2", what)
        if err:
            return err
        if not os.path.exists(img) or uqtest.sha256(img) != before:
            return f"{what}: the existing image changed"
    return None


def case_self_backing(d):
    err = (refused_untouched(d, ["-b", "img.qcow2", "img.qcow2"], "-b itself")
           or refused_untouched(d, ["-o", "backing_file=img.qcow2", "img.qcow2"],
                                "-o backing_file=itself"))
    if err:
        return err
    # Under another name qemu-img (with -F) makes the looping image; we refuse
    # it as well, and leave the file as it was.
    uqtest.qemu_create(os.path.join(d, "img.qcow2"), "1M")
    os.symlink("img.qcow2", os.path.join(d, "link.qcow2"))
    before = uqtest.sha256(os.path.join(d, "img.qcow2"))
    for b in ("./img.qcow2", "link.qcow2"):
        p = uqtest.uq("create", "-f", "qcow2", "-b", b, "-F", "qcow2", "img.qcow2", cwd=d,
                      check=False)
        err = one_line_error(p, "img.qcow2", f"-b {b}")
        if err:
            return err
        if uqtest.sha256(os.path.join(d, "img.qcow2")) != before:
            return f"-b {b}: the existing image changed"
    return None


def case_unsafe_no_fmt(d):
    uqtest.qemu_create(os.path.join(d, "base.qcow2"), "1M")
    return refused_untouched(d, ["-u", "-b", "base.qcow2", "img.qcow2", "1M"],
                             "-u without -F")


def case_data_file_fails(d):
    img = os.path.join(d, "img.qcow2")
    uqtest.qemu_create(img, "1M")
    before = uqtest.sha256(img)
    p = uqtest.uq("create", "-f", "qcow2", "-o", f"data_file={d}/no/such/dir/x.data",
                  img, "1M", check=False)
    err = one_line_error(p, img, "unwritable data file")
    if err:
        return err
    if uqtest.sha256(img) != before:
        return "the existing image changed although the data file could not be made"
    # And it still works where the data file can be made.
    uqtest.uq("create", "-f", "qcow2", "-o", f"data_file={d}/x.data", img, "1M")
    return uqtest.qemu_check_clean("after create with a data file", img)


def both_json(d, *args):
    ours = uqtest.uq(*args, cwd=d)
    theirs = uqtest.qemu_img(*args, cwd=d)
    return json.loads(ours.stdout), json.loads(theirs.stdout)


def case_raw_partial_sector(d):
    for size in (5, 513, 4097):
        name = f"r{size}.img"
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"\x5a" * size)
        for args in (["info", "--output=json"], ["map", "--output=json"]):
            ours, theirs = both_json(d, *args, name)
            if args[0] == "info":
                ours = {k: ours.get(k) for k in ("virtual-size", "format")}
                theirs = {k: theirs.get(k) for k in ("virtual-size", "format")}
            if ours != theirs:
                return f"{args[0]} of a {size}-byte raw file: {ours} vs qemu-img's {theirs}"
        # A qcow2 over it takes the rounded size as qemu-img does.
        ovl = f"o{size}.qcow2"
        uqtest.uq("create", "-f", "qcow2", "-b", name, "-F", "raw", ovl, cwd=d)
        ours = json.loads(uqtest.uq("info", "--output=json", ovl, cwd=d).stdout)
        if ours["virtual-size"] != (size + 511) // 512 * 512:
            return f"overlay of a {size}-byte raw file: virtual size {ours['virtual-size']}"
    return None


def case_map_data_file(d):
    img = os.path.join(d, "df.qcow2")
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=df.data", "df.qcow2",
                    "4M", cwd=d)
    uqtest.qemu_io("qcow2", img, ["write -P 1 0 64k", "write -P 2 1M 128k"], cwd=d)
    ours = uqtest.uq("map", "df.qcow2", cwd=d).stdout
    theirs = uqtest.qemu_img("map", "df.qcow2", cwd=d).stdout
    if "df.data" not in theirs:
        return f"qemu-img map does not name the data file; the case is wrong:\n{theirs}"
    if ours != theirs:
        return f"map:\n{ours}vs qemu-img's:\n{theirs}"
    return None


def case_convert_onto_source(d):
    q = uqtest.qemu_img
    q("create", "-q", "-f", "raw", "base.raw", "4M", cwd=d)
    uqtest.qemu_io("raw", f"{d}/base.raw", ["write -P 7 0 1M"])
    q("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2", cwd=d)
    uqtest.qemu_io("qcow2", f"{d}/top.qcow2", ["write -P 8 1M 64k"])
    q("create", "-q", "-f", "qcow2", "-o", "data_file=df.data", "df.qcow2", "4M", cwd=d)
    uqtest.qemu_io("qcow2", f"{d}/df.qcow2", ["write -P 9 0 64k"], cwd=d)
    os.symlink("top.qcow2", f"{d}/link.qcow2")
    files = ("base.raw", "top.qcow2", "df.qcow2", "df.data")
    sums = {f: uqtest.sha256(f"{d}/{f}") for f in files}
    for args in (["top.qcow2", "top.qcow2"], ["top.qcow2", "./top.qcow2"],
                 ["top.qcow2", "link.qcow2"], ["top.qcow2", "base.raw"],
                 ["-O", "raw", "top.qcow2", "base.raw"], ["df.qcow2", "df.data"],
                 ["-o", "data_file=base.raw", "top.qcow2", "new.qcow2"]):
        full = ["convert", "-O", "qcow2"] + args
        p = uqtest.uq(*full, cwd=d, check=False)
        err = one_line_error(p, args[-1], " ".join(full))
        if err:
            return err
        for f in files:
            if uqtest.sha256(f"{d}/{f}") != sums[f]:
                return f"{' '.join(full)}: {f} changed"
        if os.path.exists(f"{d}/new.qcow2"):
            return f"{' '.join(full)}: left new.qcow2 behind"
    # A target outside the chain still works.
    uqtest.uq("convert", "-O", "qcow2", "top.qcow2", "out.qcow2", cwd=d)
    p = q("compare", "top.qcow2", "out.qcow2", cwd=d, check=False)
    if p.returncode != 0:
        return f"convert to a fresh file: qemu-img compare says {p.stdout.strip()}"
    return None


def info_text(who, args, d):
    """@who's info output without the lines about disk usage."""
    out = who("info", *args, cwd=d).stdout
    return "".join(l + "\n" for l in out.splitlines()
                   if "disk size" not in l and "actual-size" not in l)


def set_bitmap_flag(path, index, flag):
    """Set @flag in the directory entry @index of @path's bitmaps extension."""
    with open(path, "r+b") as f:
        h = f.read(65536)
        pos = struct.unpack(">I", h[100:104])[0]
        while True:
            t, n = struct.unpack(">II", h[pos:pos + 8])
            if t == 0x23852875:
                break
            if t == 0:
                raise AssertionError(f"{path}: no bitmaps extension")
            pos += 8 + ((n + 7) & ~7)
        nb, _, _, off = struct.unpack(">IIQQ", h[pos + 8:pos + 32])
        for _ in range(index):
            f.seek(off + 18)
            name, extra = struct.unpack(">HI", f.read(6))
            off += (24 + extra + name + 7) & ~7
        f.seek(off + 12)
        flags = struct.unpack(">I", f.read(4))[0]
        f.seek(off + 12)
        f.write(struct.pack(">I", flags | flag))


def case_info_bitmaps(d):
    q = uqtest.qemu_img
    q("create", "-q", "-f", "qcow2", "bm.qcow2", "8M", cwd=d)
    q("bitmap", "--add", "bm.qcow2", "b0", cwd=d)
    q("bitmap", "--add", "-g", "4096", "--disable", "bm.qcow2", "second one", cwd=d)
    q("bitmap", "--add", "-g", "1M", "bm.qcow2", "third", cwd=d)
    set_bitmap_flag(f"{d}/bm.qcow2", 2, 1)          # in use
    q("create", "-q", "-f", "qcow2", "-b", "bm.qcow2", "-F", "qcow2", "top.qcow2", cwd=d)
    theirs = q("info", "--output=json", "bm.qcow2", cwd=d).stdout
    if theirs.count("granularity") != 3 or "in-use" not in theirs:
        return f"qemu-img does not list the three bitmaps; the case is wrong:\n{theirs}"
    for args in ([], ["--output=json"], ["--backing-chain", "--output=json"],
                 ["--backing-chain"]):
        for img in ("bm.qcow2", "top.qcow2"):
            ours = info_text(uqtest.uq, args + [img], d)
            theirs = info_text(q, args + [img], d)
            if ours != theirs:
                return f"info {' '.join(args)} {img}:\n{ours}vs qemu-img's:\n{theirs}"
    # Autoclear bit 0 clear: a program without bitmap support wrote the
    # image; qemu-img lists no bitmaps then.
    with open(f"{d}/bm.qcow2", "r+b") as f:
        f.seek(88)
        ac = struct.unpack(">Q", f.read(8))[0]
        f.seek(88)
        f.write(struct.pack(">Q", ac & ~1))
    ours = info_text(uqtest.uq, ["--output=json", "bm.qcow2"], d)
    theirs = info_text(q, ["--output=json", "bm.qcow2"], d)
    if "bitmaps" in theirs or ours != theirs:
        return f"stale bitmaps: info\n{ours}vs qemu-img's:\n{theirs}"
    return None


SIZES = ["1M", "1000", "1.1M", "0.3M", "2.7G", "1.0", "1.", "1.k", "+1M", " 1M",
         "1.0000000001M", "0x10k", "1.5", "1.5b", "0x1.8M", "1.e3", "1.5 M", "- 1M",
         "+-1M", "1Mx", "64P", "16E"]


def case_create_sizes(d):
    bad = []
    for size in SIZES:
        got = []
        for who, run in (("qemu-img", uqtest.qemu_img), ("ours", uqtest.uq)):
            img = os.path.join(d, f"{who}.qcow2")
            if os.path.exists(img):
                os.unlink(img)
            p = run("create", "-f", "qcow2", img, size, check=False)
            if p.returncode:
                got.append(None)
                continue
            info = json.loads(uqtest.qemu_img("info", "--output=json", img).stdout)
            got.append(info["virtual-size"])
        if got[0] != got[1]:
            bad.append(f"{size!r}: {got[1]} vs qemu-img's {got[0]} (None: refused)")
    return "; ".join(bad) if bad else None


def case_check_backing_gone(d):
    q = uqtest.qemu_img
    q("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "orphan.qcow2",
      "8M", cwd=d)
    for args in (["check"], ["check", "--output=json"], ["check", "-r", "all"]):
        theirs = q(*args, "orphan.qcow2", cwd=d, check=False)
        ours = uqtest.uq(*args, "orphan.qcow2", cwd=d, check=False)
        if theirs.returncode != 1:
            return f"qemu-img {' '.join(args)} exits {theirs.returncode}; the case is wrong"
        if ours.returncode != 1:
            return f"{' '.join(args)}: exit {ours.returncode}, qemu-img's 1"
        err = one_line_error(ours, "gone.qcow2", " ".join(args))
        if err:
            return err
    # With the backing file back, the check passes.
    q("create", "-q", "-f", "qcow2", "gone.qcow2", "8M", cwd=d)
    p = uqtest.uq("check", "orphan.qcow2", cwd=d, check=False)
    if p.returncode != 0:
        return f"check with the backing file present: exit {p.returncode}: {p.stderr.strip()}"
    return None


def case_create_option_lists(d):
    uqtest.qemu_create(os.path.join(d, "base.qcow2"), "3M")
    with open(os.path.join(d, "other.raw"), "wb") as f:
        f.truncate(5 << 20)
    for args in (["-o", "cluster_size=64k,", "img.qcow2", "1M"],
                 ["-o", ",cluster_size=64k", "img.qcow2", "1M"],
                 ["-o", "=4k", "img.qcow2", "1M"],
                 ["-o", "", "img.qcow2", "1M"],
                 ["-o", "size=2M", "img.qcow2", "1M"],
                 ["-b", "", "img.qcow2", "1M"],
                 ["-o", "backing_file=", "img.qcow2", "1M"]):
        err = refused_untouched(d, args, " ".join(repr(a) for a in args))
        if err:
            return err
    # Accepted the same way: the resulting images agree.
    for args in (["-o", "size=2M", "IMG"],
                 ["-b", "base.qcow2", "-F", "qcow2", "-o", "backing_file=other.raw", "IMG"],
                 ["-b", "base.qcow2", "-o", "backing_fmt=raw", "-F", "qcow2", "IMG"]):
        got = []
        for who, run in (("qemu-img", uqtest.qemu_img), ("ours", uqtest.uq)):
            img = f"{who}.qcow2"
            run("create", "-f", "qcow2", *[img if a == "IMG" else a for a in args], cwd=d)
            info = json.loads(uqtest.qemu_img("info", "--output=json", img, cwd=d).stdout)
            got.append({k: info.get(k) for k in ("virtual-size", "backing-filename",
                                                 "backing-filename-format")})
        if got[0] != got[1]:
            return f"create {' '.join(args)}: {got[1]} vs qemu-img's {got[0]}"
    return None


def case_raw_actual_size(d):
    for args in (["1000"], ["1G"], ["0"], ["-o", "preallocation=falloc", "1M"]):
        got = []
        for who, run in (("qemu-img", uqtest.qemu_img), ("ours", uqtest.uq)):
            img = f"{who}.raw"
            run("create", "-f", "raw", img, *args, cwd=d)
            info = json.loads(uqtest.qemu_img("info", "--output=json", img, cwd=d).stdout)
            got.append((info["virtual-size"], info["actual-size"]))
        if got[0] != got[1]:
            return f"create -f raw {' '.join(args)}: (size, actual-size) {got[1]} vs qemu-img's {got[0]}"
    uqtest.qemu_create(f"{d}/src.qcow2", "4M")
    uqtest.qemu_io("qcow2", f"{d}/src.qcow2", ["write -P 1 1M 64k", "write -P 2 3M 4k"])
    got = []
    for who, run in (("qemu-img", uqtest.qemu_img), ("ours", uqtest.uq)):
        run("convert", "-O", "raw", "src.qcow2", f"{who}.out", cwd=d)
        got.append(json.loads(uqtest.qemu_img("info", "--output=json", f"{who}.out",
                                              cwd=d).stdout)["actual-size"])
    if got[0] != got[1]:
        return f"convert -O raw: actual-size {got[1]} vs qemu-img's {got[0]}"
    return None


def case_data_file_is_image(d):
    for args in (["-o", "data_file=img.qcow2", "img.qcow2", "1M"],
                 ["-o", "data_file=./img.qcow2", "img.qcow2", "1M"]):
        err = refused_untouched(d, args, " ".join(args))
        if err:
            return err
    # A fresh name: refused and nothing left behind.
    p = uqtest.uq("create", "-o", "data_file=new.qcow2", "new.qcow2", "1M", cwd=d,
                  check=False)
    if p.returncode == 0 or os.path.exists(f"{d}/new.qcow2"):
        return f"create -o data_file=new.qcow2 new.qcow2: exit {p.returncode}"
    # Made by qemu-img under another name, then renamed to its data file's.
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=self.qcow2", "tmp.qcow2",
                    "1M", cwd=d)
    os.rename(f"{d}/tmp.qcow2", f"{d}/self.qcow2")
    before = uqtest.sha256(f"{d}/self.qcow2")
    for args in (["info", "self.qcow2"], ["map", "self.qcow2"], ["check", "self.qcow2"],
                 ["convert", "-O", "raw", "self.qcow2", "out.raw"]):
        theirs = uqtest.qemu_img(*args, cwd=d, check=False).returncode
        ours = uqtest.uq(*args, cwd=d, check=False).returncode
        if ours != theirs:
            return f"{' '.join(args)} of a self-referencing image: exit {ours}, qemu-img's {theirs}"
    for args in (["io", "self.qcow2", "-c", "write -P 7 0 64k"], ["check", "-r", "all", "self.qcow2"]):
        p = uqtest.uq(*args, cwd=d, check=False)
        err = one_line_error(p, "self.qcow2", " ".join(args))
        if err:
            return err
    if uqtest.sha256(f"{d}/self.qcow2") != before:
        return "the self-referencing image changed"
    return None


def case_map_encrypted(d):
    secret = ["--object", "secret,id=s0,data=pw"]
    opts = "driver=qcow2,file.filename=lk.qcow2,encrypt.key-secret=s0"
    uqtest.qemu_img_luks("create", "-q", "-f", "qcow2", *secret, "-o",
                         "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                         "lk.qcow2", "8M", cwd=d)
    uqtest.run(["qemu-io", *secret, "--image-opts", opts, "-c", "write -P 1 0 128k",
                "-c", "write -z 1M 64k", "-c", "write -P 2 3M 64k"], cwd=d)
    theirs = uqtest.qemu_img("map", "--output=json", *secret, "--image-opts", opts, cwd=d)
    ours = uqtest.uq("map", "--output=json", *secret, "lk.qcow2", cwd=d)
    a, b = json.loads(ours.stdout), json.loads(theirs.stdout)
    if not any(e["data"] for e in b):
        return f"qemu-img map shows no data; the case is wrong: {b}"
    if a != b:
        return f"map --output=json: {a} vs qemu-img's {b}"
    theirs = uqtest.qemu_img("map", *secret, "--image-opts", opts, cwd=d, check=False)
    ours = uqtest.uq("map", *secret, "lk.qcow2", cwd=d, check=False)
    if theirs.returncode == 0:
        return "qemu-img's human map of an encrypted image succeeds; the case is wrong"
    return one_line_error(ours, "lk.qcow2", "human map of an encrypted image")


def case_create_prealloc_backing(d):
    uqtest.qemu_create(os.path.join(d, "base.qcow2"), "1M")
    for mode in ("metadata", "falloc", "full"):
        err = refused_untouched(d, ["-b", "base.qcow2", "-F", "qcow2", "-o",
                                    f"preallocation={mode}", "img.qcow2"], f"preallocation={mode}")
        if err:
            return err
    # With subclusters it is allowed, and the backing data still shows.
    uqtest.qemu_io("qcow2", f"{d}/base.qcow2", ["write -P 5 0 64k"])
    uqtest.uq("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o",
              "preallocation=metadata,extended_l2=on", "ok.qcow2", cwd=d)
    uqtest.qemu_io("qcow2", f"{d}/ok.qcow2", ["read -P 5 0 64k"])
    return uqtest.qemu_check_clean("preallocated extended_l2 overlay", f"{d}/ok.qcow2")


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    res = uqtest.Results("test_contract_tools")
    res.each_in_scratch("contract", (
        ("create-self-backing", case_self_backing),
        ("create-unsafe-no-fmt", case_unsafe_no_fmt),
        ("create-data-file-fails", case_data_file_fails),
        ("raw-partial-sector", case_raw_partial_sector),
        ("map-data-file", case_map_data_file),
        ("convert-onto-source", case_convert_onto_source),
        ("info-bitmaps", case_info_bitmaps),
        ("create-sizes", case_create_sizes),
        ("check-backing-gone", case_check_backing_gone),
        ("create-option-lists", case_create_option_lists),
        ("raw-actual-size", case_raw_actual_size),
        ("data-file-is-image", case_data_file_is_image),
        ("map-encrypted", case_map_encrypted),
        ("create-prealloc-backing", case_create_prealloc_backing),
    ))
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
