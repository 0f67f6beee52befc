#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Corners of check, snapshot and add that an independent contract battery
found disagreeing with qemu-img 7.2 (each case once failed):

  add-cache-size          `add --cache-size` beyond what the engine takes
                          (1E, 9G) is refused by the CLI with one line
                          naming the size, before anything touches the
                          ublk driver (the daemon used to find out).
  luks-no-key             an encrypted image without its key: qemu-img
                          check, check -r, map, convert and snapshot fail
                          to open it (exit 1), info works; so do we, with
                          one line naming the file, the image untouched.
  refblock-past-eof       a refcount table entry past the end of the file:
                          check and check -r all report the counts qemu-img
                          reports (-r all used to say one corruption fewer:
                          qemu-img grows the file and finds the block's own
                          refcount 0); the repaired image is clean. Only the
                          image end after the rebuild differs (ours puts the
                          new refcount blocks at the end).
  snapshot-table-past-eof the header's snapshot table offset past the end
                          of the file (v3 and v2 images): qemu-img check
                          reports it (the table reads as zeros: incomplete
                          entries, a region past the end, leaks) and -r all
                          repairs it; we refused to open the image. Now
                          check, -r leaks and -r all give qemu-img's exit
                          status and counts, the repaired image checks
                          clean in both; info, io and add still refuse the
                          hostile image with one line, leaving it as it was.
  snapshot-apply-smaller  snapshot -a NAME of a snapshot with a smaller
                          disk, made by qemu-img (its L2 tables shared with
                          the active state), after a resize and writes: we
                          refused ("L2 table ... shared with a snapshot")
                          where qemu-img applies it. Also resize --shrink
                          through a shared L2 table holding data. Each
                          result reads as qemu-img's and checks clean.
"""

import json
import os
import shutil
import struct
import sys

import uqtest

PW = "corner-pw"
COUNTS = ("corruptions", "corruptions-fixed", "leaks", "leaks-fixed", "check-errors",
          "total-clusters", "allocated-clusters")


def check_json(run, args, path):
    p = run("check", *args, "--output=json", path, check=False)
    try:
        return p.returncode, json.loads(p.stdout)
    except ValueError:
        return p.returncode, {"stdout": p.stdout, "stderr": p.stderr}


def compare_checks(d, src, args, keys=COUNTS):
    """check @args on a copy of @src by qemu-img and by us: exit and counts."""
    out = {}
    for who, run in (("qemu-img", uqtest.qemu_img), ("ours", uqtest.uq)):
        img = os.path.join(d, f"{who}.qcow2")
        with open(src, "rb") as a, open(img, "wb") as b:
            b.write(a.read())
        out[who] = check_json(run, args, img) + (img,)
    (rq, jq, _), (ro, jo, img) = out["qemu-img"], out["ours"]
    a = {k: jo.get(k, 0) for k in keys}
    b = {k: jq.get(k, 0) for k in keys}
    if ro != rq or a != b:
        return f"check {' '.join(args)}: exit {ro} {a}, qemu-img's exit {rq} {b}", img
    return None, img


def one_line_error(p, name, what):
    lines = p.stderr.strip().splitlines()
    if p.returncode == 0:
        return f"{what}: exit 0, expected an error"
    if len(lines) != 1 or name not in lines[0]:
        return f"{what}: expected one error line naming {name}, got {p.stderr!r}"
    return None


def case_add_cache_size(d):
    img = os.path.join(d, "a.qcow2")
    uqtest.qemu_create(img, "8M")
    for size in ("1E", "9G", "8193M"):
        p = uqtest.uq("add", "--foreground", "--cache-size", size, img, check=False)
        err = one_line_error(p, size, f"--cache-size {size}")
        if err:
            return err
        if "too large" not in p.stderr or "ublk" in p.stderr.lower().replace("ublk-qcow2", ""):
            return f"--cache-size {size}: not the size error: {p.stderr!r}"
    return None


def case_luks_no_key(d):
    obj = ["--object", f"secret,id=s0,data={PW}"]
    img = os.path.join(d, "lk.qcow2")
    uqtest.qemu_img_luks("create", "-q", "-f", "qcow2", *obj, "-o",
                         "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                         img, "8M")
    uqtest.run(["qemu-io", *obj, "--image-opts",
                f"driver=qcow2,file.filename={img},encrypt.key-secret=s0",
                "-c", "write -P 7 0 64k"])
    before = uqtest.sha256(img)
    out = os.path.join(d, "out.raw")
    for args in (["check"], ["check", "--output=json"], ["check", "-r", "all"],
                 ["check", "-r", "leaks"], ["map"], ["map", "--output=json"],
                 ["snapshot", "-l"], ["snapshot", "-c", "s1"],
                 ["convert", "-O", "raw"]):
        tail = [img, out] if args[0] == "convert" else [img]
        theirs = uqtest.qemu_img(*args, *tail, check=False)
        if theirs.returncode != 1:
            return f"qemu-img {' '.join(args)} exits {theirs.returncode}; the case is wrong"
        ours = uqtest.uq(*args, *tail, check=False)
        if ours.returncode != 1:
            return f"{' '.join(args)}: exit {ours.returncode}, qemu-img's 1"
        err = one_line_error(ours, "lk.qcow2", " ".join(args))
        if err:
            return err
        if uqtest.sha256(img) != before:
            return f"{' '.join(args)} without a key changed the image"
        if os.path.exists(out):
            return "convert without a key wrote its target"
    # info needs no key, in both.
    for run in (uqtest.qemu_img, uqtest.uq):
        p = run("info", "--output=json", img, check=False)
        if p.returncode != 0 or not json.loads(p.stdout).get("encrypted"):
            return f"info without a key: exit {p.returncode}: {p.stderr.strip()}"
    # With the key, the same commands work.
    p = uqtest.uq("check", "--key-secret", PW, img, check=False)
    if p.returncode != 0:
        return f"check with the key: exit {p.returncode}: {p.stderr.strip()}"
    p = uqtest.uq("snapshot", "--key-secret", PW, "-c", "s1", img, check=False)
    if p.returncode != 0:
        return f"snapshot -c with the key: exit {p.returncode}: {p.stderr.strip()}"
    p = uqtest.qemu_img("snapshot", *obj, "-l", "--image-opts",
                        f"driver=qcow2,file.filename={img},encrypt.key-secret=s0")
    if " s1 " not in p.stdout:
        return f"qemu-img does not list the snapshot made with the key:\n{p.stdout}"
    return None


def case_refblock_past_eof(d):
    img = os.path.join(d, "rb.qcow2")
    uqtest.qemu_create(img, "64M")
    uqtest.qemu_io("qcow2", img, ["write -P 1 0 1M"])
    with open(img, "r+b") as f:
        rt = struct.unpack(">Q", f.read(56)[48:56])[0]
        f.seek(rt)
        f.write(struct.pack(">Q", 1 << 30))
    for args in ([], ["-r", "leaks"]):
        err, _ = compare_checks(d, img, args, COUNTS + ("image-end-offset",))
        if err:
            return err
    err, fixed = compare_checks(d, img, ["-r", "all"])
    if err:
        return err
    return uqtest.qemu_check_clean("after check -r all", fixed)


def case_snapshot_table_past_eof(d):
    for compat in ("1.1", "0.10"):
        img = os.path.join(d, f"st{compat}.qcow2")
        uqtest.qemu_create(img, "64M", compat=compat)
        uqtest.qemu_io("qcow2", img, ["write -P 1 0 1M"])
        uqtest.qemu_img("snapshot", "-c", "snap1", img)
        with open(img, "r+b") as f:
            f.seek(64)
            f.write(struct.pack(">Q", 1 << 30))
        before = uqtest.sha256(img)
        for args in ([], ["-r", "leaks"], ["-r", "all"]):
            err, fixed = compare_checks(d, img, args, COUNTS + ("image-end-offset",))
            if err:
                return f"compat={compat}: {err}"
        if compat == "1.1":
            err = uqtest.qemu_check_clean("after our check -r all", fixed)
            if err:
                return err
            p = uqtest.uq("check", fixed, check=False)
            if p.returncode != 0:
                return f"our check after our repair: exit {p.returncode}: {p.stderr.strip()}"
        for args in (["info", img], ["io", img, "-c", "read 0 4k"],
                     ["io", img, "-c", "write 0 4k"], ["snapshot", "-l", img],
                     ["add", "--foreground", img]):
            p = uqtest.uq(*args, check=False)
            err = one_line_error(p, os.path.basename(img), " ".join(args[:2]))
            if err:
                return err
            if "snapshot table" not in p.stderr:
                return f"{args[0]}: not the snapshot table error: {p.stderr.strip()}"
        if uqtest.sha256(img) != before:
            return "a refused command changed the image"
    return None


def case_snapshot_past_eof_rebuild(d):
    """A snapshot table just past the end of the file plus a refcount that
    forces a rebuild: the rebuilt refcount structures land where the table
    pointed, so its rewrite must not free them, while a table right at the
    end of the file is counted and must be (review of 2026-11-26)."""
    for gap in (0, 1):
        err = snapshot_past_eof_rebuild(d, gap)
        if err:
            return f"table {gap} cluster(s) past the end: {err}"
    return None


def snapshot_past_eof_rebuild(d, gap):
    img = os.path.join(d, "r.qcow2")
    uqtest.qemu_create(img, "4M")
    uqtest.qemu_io("qcow2", img, ["write -P 1 0 1M"])
    uqtest.qemu_img("snapshot", "-c", "s1", img)
    uqtest.qemu_io("qcow2", img, ["write -P 2 0 64k"])
    with open(img, "r+b") as f:
        h = f.read(72)
        cs = 1 << struct.unpack(">I", h[20:24])[0]
        rt = struct.unpack(">Q", h[48:56])[0]
        size = os.path.getsize(img)
        f.seek(64)
        f.write(struct.pack(">Q", ((size + cs - 1) // cs + gap) * cs))
        f.seek(rt)
        rb = struct.unpack(">Q", f.read(8))[0]
        f.seek(rb + 2 * (size // cs - 1))
        f.write(b"\0\0")
    ref = os.path.join(d, "q.qcow2")
    shutil.copyfile(img, ref)
    p = uqtest.uq("check", "-r", "all", img, check=False)
    q = uqtest.qemu_img("check", "-r", "all", ref, check=False)
    if p.returncode != q.returncode:
        return f"check -r all: exit {p.returncode}, qemu-img {q.returncode}: {p.stdout}{p.stderr}"
    err = uqtest.qemu_check_clean("after our check -r all", img)
    if err:
        return err
    p = uqtest.qemu_img("compare", img, ref, check=False)
    if p.returncode != 0:
        return f"our repair reads unlike qemu-img's: {(p.stdout + p.stderr).strip()}"
    return None


def case_snapshot_apply_broken(d):
    """snapshot -a of a snapshot of another size whose L1 offset is broken:
    refused before the resize, the image untouched (as qemu-img)."""
    img = os.path.join(d, "a.qcow2")
    uqtest.qemu_create(img, "2M")
    uqtest.qemu_io("qcow2", img, ["write -P 0x11 0 1M"])
    uqtest.qemu_img("snapshot", "-c", "s1", img)
    uqtest.qemu_img("resize", "-q", img, "4M")
    uqtest.qemu_io("qcow2", img, ["write -P 0x33 3M 512k"])
    with open(img, "r+b") as f:
        so = struct.unpack(">Q", f.read(72)[64:72])[0]
        f.seek(so)
        l1 = struct.unpack(">Q", f.read(8))[0]
        f.seek(so)
        f.write(struct.pack(">Q", l1 + 8))
    before = uqtest.sha256(img)
    shutil.copyfile(img, img + ".q")
    q = uqtest.qemu_img("snapshot", "-a", "s1", img + ".q", check=False)
    p = uqtest.uq("snapshot", "-a", "s1", img, check=False)
    err = one_line_error(p, os.path.basename(img), "snapshot -a")
    if err:
        return err
    if q.returncode != 1:
        return f"qemu-img snapshot -a: exit {q.returncode}, expected 1"
    if uqtest.sha256(img) != before:
        return "a refused snapshot -a changed the image"
    return None


def same_sequence(d, steps):
    """Run the commands @steps ("{}" the image) on two like images, with
    qemu-img and with us; None when both end equal and ours checks clean."""
    imgs = {who: os.path.join(d, f"{who}.qcow2") for who in ("q", "o")}
    for who, img in imgs.items():
        uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "3M")
        uqtest.qemu_io("qcow2", img, ["write -P 1 2M 512k", "write -P 9 0 64k"])
        uqtest.qemu_img("snapshot", "-c", "small", img)
    for step in steps:
        for who, img in imgs.items():
            args = [img if a == "{}" else a for a in step]
            if who == "q":
                p = uqtest.qemu_img(*args, check=False)
            else:
                p = uqtest.uq(*args, check=False)
            if p.returncode != 0:
                who = "qemu-img" if who == "q" else "ours"
                return f"{who} {' '.join(step)}: exit {p.returncode}: {p.stderr.strip()}"
    p = uqtest.qemu_img("compare", imgs["q"], imgs["o"], check=False)
    if p.returncode != 0:
        return f"after {steps}: {(p.stdout + p.stderr).strip()}"
    return uqtest.qemu_check_clean(f"after {steps}", imgs["o"])


def case_snapshot_apply_smaller(d):
    for steps in (
            # The straddling table (2M-4M) shared, nothing past the end in it.
            [["resize", "{}", "8M"], ["snapshot", "-a", "small", "{}"]],
            [["resize", "{}", "8M"], ["snapshot", "-c", "big", "{}"],
             ["snapshot", "-a", "small", "{}"]],
            [["resize", "{}", "8M"], ["snapshot", "-a", "small", "{}"],
             ["snapshot", "-a", "small", "{}"]]):
        err = same_sequence(d, steps)
        if err:
            return err
    # Writes after the resize, in a new table and in the shared one.
    for cmds in (["write -P 3 5M 64k"], ["write -P 4 1M 64k", "write -P 5 7M 4k"]):
        imgs = []
        for who in ("q", "o"):
            img = os.path.join(d, f"w{who}.qcow2")
            imgs.append(img)
            uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "3M")
            uqtest.qemu_io("qcow2", img, ["write -P 1 2M 512k"])
            uqtest.qemu_img("snapshot", "-c", "small", img)
            if who == "q":
                uqtest.qemu_img("resize", "-q", img, "8M")
                uqtest.qemu_io("qcow2", img, cmds)
                uqtest.qemu_img("snapshot", "-a", "small", img)
            else:
                uqtest.uq("resize", img, "8M")
                uqtest.uq("io", img, *[a for c in cmds for a in ("-c", c)])
                p = uqtest.uq("snapshot", "-a", "small", img, check=False)
                if p.returncode != 0:
                    return f"snapshot -a after {cmds}: exit {p.returncode}: {p.stderr.strip()}"
        p = uqtest.qemu_img("compare", *imgs, check=False)
        if p.returncode != 0:
            return f"snapshot -a after {cmds}: {(p.stdout + p.stderr).strip()}"
        err = uqtest.qemu_check_clean(f"snapshot -a after {cmds}", imgs[1])
        if err:
            return err
    # resize --shrink through a table shared with a bigger snapshot, data in it.
    imgs = []
    for who in ("q", "o"):
        img = os.path.join(d, f"s{who}.qcow2")
        imgs.append(img)
        uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "8M")
        uqtest.qemu_io("qcow2", img, ["write -P 1 2M 2M"])
        uqtest.qemu_img("snapshot", "-c", "big", img)
        run = uqtest.qemu_img if who == "q" else uqtest.uq
        p = run("resize", "--shrink", img, "3M", check=False)
        if p.returncode != 0:
            return f"{who}: resize --shrink: exit {p.returncode}: {p.stderr.strip()}"
    for step in ([], ["snapshot", "-a", "big"]):
        if step:
            uqtest.qemu_img(*step, imgs[0])
            uqtest.uq(*step, imgs[1])
        err = uqtest.compare_clean(f"shrink {step}", *imgs)
        if err:
            return err
    return None


def case_snapshot_backing_missing(d):
    """Every snapshot action opens the backing chain first, as qemu-img does."""
    base = os.path.join(d, "base.qcow2")
    top = os.path.join(d, "top.qcow2")
    uqtest.qemu_create(base, "1M")
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    uqtest.qemu_img("snapshot", "-c", "s0", top)
    os.unlink(base)
    with open(top, "rb") as f:
        before = f.read()
    for args in (["-l"], ["-c", "s1"], ["-a", "s0"], ["-d", "s0"]):
        what = "snapshot " + " ".join(args)
        q = uqtest.qemu_img("snapshot", *args, top, check=False)
        p = uqtest.uq("snapshot", *args, top, check=False)
        err = one_line_error(p, "base.qcow2", what)
        if err:
            return err
        if q.returncode == 0:
            return f"{what}: qemu-img succeeded, the case needs revisiting"
        with open(top, "rb") as f:
            if f.read() != before:
                return f"{what}: the image changed"
    return None


def case_info_data_file_missing(d):
    """info shows an image whose data file is gone or unnamed, as qemu-img info."""
    img = os.path.join(d, "df.qcow2")
    data = os.path.join(d, "df.raw")
    uqtest.qemu_create(img, "1M", data_file=data)
    os.unlink(data)
    unnamed = os.path.join(d, "unnamed.qcow2")
    uqtest.qemu_create(unnamed, "1M")
    with open(unnamed, "r+b") as f:
        f.seek(72)                      # incompatible features: bit 2, external data file
        f.write(struct.pack(">Q", 4))
    for path, name in ((img, "df.raw"), (unnamed, "unnamed.qcow2")):
        for args in ([], ["--output=json"]):
            q = uqtest.qemu_img("info", *args, path)
            p = uqtest.uq("info", *args, path, check=False)
            if p.returncode or p.stdout != q.stdout:
                return (f"info {' '.join(args)} {path}: exit {p.returncode}, "
                        f"{p.stdout + p.stderr!r}, qemu-img: {q.stdout!r}")
        # Only info goes without the data file.
        p = uqtest.uq("io", "-c", "read 0 4k", path, check=False)
        err = one_line_error(p, name, f"io read of {path}")
        if err:
            return err
    return None


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    res = uqtest.Results("test_contract_corners")
    res.each_in_scratch("corners", (
        ("add-cache-size", case_add_cache_size),
        ("luks-no-key", case_luks_no_key),
        ("refblock-past-eof", case_refblock_past_eof),
        ("snapshot-table-past-eof", case_snapshot_table_past_eof),
        ("snapshot-apply-smaller", case_snapshot_apply_smaller),
        ("snapshot-past-eof-rebuild", case_snapshot_past_eof_rebuild),
        ("snapshot-apply-broken", case_snapshot_apply_broken),
        ("snapshot-backing-missing", case_snapshot_backing_missing),
        ("info-data-file-missing", case_info_data_file_missing),
    ))
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
