#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""External data files (data_file, data_file_raw) as qemu-img makes and
reads them: images we create are byte-identical to qemu-img's; images filled
by qemu-io read back identically (`convert -O raw`, `map --output=json`);
seeded writes through `ublk-qcow2 io` agree with qemu-io on a raw mirror and
pass `qemu-img check`; with data_file_raw the data file itself stays the raw
disk, byte for byte. `resize` grows and cuts the data file as qemu-img
resize does. Snapshots are refused; a missing data file is one clear
error line.
"""

import json
import os
import random
import sys

import uqtest

MiB = 1 << 20
SIZE = 32 * MiB


def ops(seed, n=300):
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        length = rnd.choice([512, 4096, 65536, 200704, 1536])
        off = rnd.randrange(0, (SIZE - length) // 512) * 512
        r = rnd.random()
        if r < 0.7:
            out.append((f"write -P {rnd.randrange(1, 255):#x} {off} {length}",) * 2)
        elif r < 0.85:
            out.append((f"write -z {off} {length}",) * 2)
        else:
            c = off // 65536 * 65536
            # Discard may or may not zero: the mirror gets what qcow2 shows (see below).
            out.append((f"discard {c} 65536", None))
    return out


def case_create(d, opts):
    a, b = os.path.join(d, "a"), os.path.join(d, "b")
    for x in (a, b):
        os.makedirs(x, exist_ok=True)
    o = f"data_file=data.raw,{opts}" if opts else "data_file=data.raw"
    uqtest.uq("create", "-f", "qcow2", "-o", o, "i.qcow2", "64M", cwd=a)
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", o, "i.qcow2", "64M", cwd=b)
    if open(os.path.join(a, "i.qcow2"), "rb").read() != open(os.path.join(b, "i.qcow2"), "rb").read():
        return f"-o {o}: our image differs from qemu-img's"
    if os.path.getsize(os.path.join(a, "data.raw")) != os.path.getsize(os.path.join(b, "data.raw")):
        return "the data file sizes differ"
    return None


def case_io(d, raw, made_by):
    img = os.path.join(d, f"io{raw}{made_by}.qcow2")
    data = os.path.join(d, f"io{raw}{made_by}.data")
    mirror = os.path.join(d, f"io{raw}{made_by}.mirror")
    o = f"data_file={data}" + (",data_file_raw=on" if raw else "")
    if made_by == "qemu":
        uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", o, img, str(SIZE))
    else:
        uqtest.uq("create", "-f", "qcow2", "-o", o, img, str(SIZE))
    uqtest.qemu_io("qcow2", img, ["write -P 0x3c 0 1M", "write -z 2M 64k", "write -P 0x4d 5M 100k"])
    # Our reads of what qemu-io wrote.
    ref, ours = os.path.join(d, "ref.raw"), os.path.join(d, "ours.raw")
    uqtest.qemu_img("convert", "-O", "raw", img, ref)
    uqtest.uq("convert", "-O", "raw", img, ours)
    diff = uqtest.first_difference(ref, ours)
    if diff:
        return f"convert -O raw differs from qemu-img's: {diff}"
    q = json.loads(uqtest.qemu_img("map", "--output=json", img).stdout)
    u = json.loads(uqtest.uq("map", "--output=json", img).stdout)
    keys = ("start", "length", "zero", "data", "offset")
    if [{k: e.get(k) for k in keys} for e in q] != [{k: e.get(k) for k in keys} for e in u]:
        return f"map differs:\nqemu-img {q[:4]}\nours     {u[:4]}"
    os.rename(ref, mirror)
    os.unlink(ours)
    # Our writes against qemu-io on the mirror.
    seq = ops(20 * raw + (made_by == "qemu"))
    cmdfile = img + ".ops"
    with open(cmdfile, "w") as f:
        f.write("".join(c + "\n" for c, _ in seq))
    uqtest.uq("io", img, "-C", cmdfile)
    mirror_cmds = []
    for c, m in seq:
        if m:
            mirror_cmds.append(m)
        else:
            # qcow2 discards whole clusters to zeros, with a raw data file too
            # (qemu-io 7.2 punches them there; test_combos datafile-raw-discard).
            mirror_cmds.append(c.replace("discard", "write -z"))
    for i in range(0, len(mirror_cmds), 200):
        uqtest.qemu_io("raw", mirror, mirror_cmds[i:i + 200])
    p = uqtest.qemu_img("compare", "-f", "qcow2", "-F", "raw", img, mirror, check=False)
    if p.returncode != 0:
        return f"qemu-img compare with the mirror: {(p.stdout + p.stderr).strip()}"
    p = uqtest.qemu_img("check", img, check=False)
    if p.returncode != 0:
        return f"qemu-img check exits {p.returncode}:\n{uqtest.tail(p.stdout + p.stderr, 6)}"
    if raw:
        diff = uqtest.first_difference(data, mirror)
        if diff:
            return f"data_file_raw: the data file is not the raw disk: {diff}"
    return None


def case_refusals(d):
    img = os.path.join(d, "r.qcow2")
    data = os.path.join(d, "r.data")
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", img, str(SIZE))
    before = uqtest.sha256(img)
    p = uqtest.uq("snapshot", "-c", "s1", img, check=False)
    if p.returncode == 0 or len(p.stderr.strip().splitlines()) != 1:
        return f"snapshot -c with a data file: exit {p.returncode}, {p.stderr!r}"
    if uqtest.sha256(img) != before:
        return "the refused snapshot changed the image"
    os.unlink(data)
    p = uqtest.uq("io", img, "-c", "read 0 4k", check=False)
    lines = p.stderr.strip().splitlines()
    if p.returncode == 0 or len(lines) != 1 or "data file" not in lines[0]:
        return f"missing data file: exit {p.returncode}, {p.stderr!r}"
    if uqtest.sha256(img) != before:
        return "opening with a missing data file changed the image"
    return None


def case_resize(d, raw):
    """`resize` (grow, shrink, unaligned sizes) against qemu-img resize on
    copies: the images and their data files must come out the same."""
    dirs = [os.path.join(d, f"rs{raw}{who}") for who in ("ours", "qemu")]
    o = "data_file=data.raw" + (",data_file_raw=on" if raw else "")
    for x in dirs:
        os.makedirs(x, exist_ok=True)
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", o, "i.qcow2", "64M", cwd=dirs[0])
    # The data file name is relative: each copy finds its own in its directory.
    uqtest.qemu_io("qcow2", "i.qcow2",
                   ["write -P 0x11 0 1M", "write -P 0x22 30M 4M", "write -P 0x33 63M 1M"],
                   cwd=dirs[0])
    for f in ("i.qcow2", "data.raw"):
        with open(os.path.join(dirs[0], f), "rb") as src, \
                open(os.path.join(dirs[1], f), "wb") as dst:
            dst.write(src.read())
    for args in (["+16M"], [str(100 * MiB + 512)], ["--shrink", "32M"],
                 ["--shrink", str(31 * MiB + 512)], [str(65 * MiB + 1024)], ["70M"]):
        uqtest.uq("resize", *args[:-1], "i.qcow2", args[-1], cwd=dirs[0])
        uqtest.qemu_img("resize", "-q", *args[:-1], "i.qcow2", args[-1], cwd=dirs[1])
        p = uqtest.qemu_img("check", "i.qcow2", check=False, cwd=dirs[0])
        if p.returncode != 0 or "No errors were found" not in p.stdout:
            return f"resize {args}: qemu-img check:\n{uqtest.tail(p.stdout + p.stderr, 6)}"
        m = [uqtest.qemu_img("map", "--output=json", "i.qcow2", cwd=x).stdout for x in dirs]
        if m[0] != m[1]:
            return f"resize {args}: qemu-img map differs:\n{m[0]}\n{m[1]}"
        for x in dirs:
            uqtest.qemu_img("convert", "-O", "raw", "i.qcow2", "disk.raw", cwd=x)
        da, db, ra, rb = (os.path.join(x, f) for f in ("data.raw", "disk.raw") for x in dirs)
        diff = uqtest.first_difference(ra, rb)
        if diff:
            return f"resize {args}: the disks differ: {diff}"
        if os.path.getsize(da) != os.path.getsize(db):
            return (f"resize {args}: data file {os.path.getsize(da)} bytes, "
                    f"qemu-img's {os.path.getsize(db)}")
        diff = uqtest.first_difference(da, db)
        if diff:
            return f"resize {args}: the data files differ: {diff}"
        uqtest.qemu_io("qcow2", "i.qcow2", ["read -P 0x11 0 1M", "read -P 0x22 30M 1M"],
                       cwd=dirs[0])
    return None


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    res = uqtest.Results("test_data_file")
    d = uqtest.scratch_dir("datafile")
    try:
        for opts in ("", "data_file_raw=on", "preallocation=metadata", "preallocation=falloc",
                     "extended_l2=on", "cluster_size=4096,preallocation=full"):
            res.case(f"create -o data_file,{opts}", case_create, d, opts)
        for raw in (False, True):
            for made_by in ("qemu", "ours"):
                res.case(f"io data_file_raw={'on' if raw else 'off'} (made by {made_by})",
                         case_io, d, raw, made_by)
        for raw in (False, True):
            res.case(f"resize data_file_raw={'on' if raw else 'off'}", case_resize, d, raw)
        res.case("snapshots refused, missing data file", case_refusals, d)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
