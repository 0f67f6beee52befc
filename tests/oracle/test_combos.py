#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Feature combinations that disagreed with qemu-img/qemu-io 7.2 (each case
once failed):

  datafile-el2-offset0  an external data file with extended L2 (and, for
                        the zero cluster rule, without): guest cluster 0
                        lies at data-file offset 0, where its L2 entry has
                        offset 0 and only COPIED says it is allocated. We
                        called every such image corrupt ("allocated
                        subclusters without a cluster"); map printed its
                        unused subclusters without "offset": 0, split in
                        two; write -z (no unmap) dropped the cluster where
                        QEMU keeps it zeroed. Now map, map --output=json,
                        convert -O raw and io (write, write -z with and
                        without -u, discard) give qemu-img/qemu-io's text,
                        bytes and L2 state, and every result checks clean.
  luks-compressed       compressed clusters in a LUKS image (qemu-io write
                        -c stores them unencrypted and reads them so): we
                        called the image corrupt on the first read. Now
                        read, convert -O raw, and writes over them (with
                        extended L2 too) agree with qemu-io and check
                        clean; convert -c to an encrypted target is refused
                        with one line and no file, as qemu-img refuses it
                        (we wrote plaintext compressed clusters).
  convert-el2-order     convert -O qcow2 -o extended_l2=on of a chain whose
                        runs are subcluster-sized: the target's clusters
                        were allocated in the order reads completed (its
                        map scattered, fragment per cluster); writes now go
                        in guest order, as qemu-img convert's, and the map
                        is qemu-img's, text for text.
  datafile-raw-discard  discard on an image with a raw external data file
                        (data_file_raw=on, with and without extended L2):
                        QEMU's whole clusters read as zeros after it (it
                        punches them in the data file), partial ones keep
                        their bytes; we ignored every discard, so the disk
                        read differently from qemu-io's copy. Now it reads
                        the same and checks clean.
  luks-backing-info     info --output=json (and --backing-chain) of an
                        encrypted image with a backing file: qemu-img puts
                        "encrypted" between "full-backing-filename" and
                        "backing-filename"; we put it after both.
"""

import json
import os
import sys

import uqtest

PW = "combo-pw"


def text_diff(what, theirs, ours):
    if theirs == ours:
        return None
    a, b = theirs.splitlines(), ours.splitlines()
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"{what}: line {i + 1}: qemu-img {x!r}, ours {y!r}"
    return f"{what}: qemu-img {len(a)} lines, ours {len(b)}"


def datafile_image(d, who, opts, build):
    """A qcow2 image in @d/@who with data file @d/@who/t.data, built by qemu-io."""
    os.makedirs(os.path.join(d, who), exist_ok=True)
    img = os.path.join(d, who, "t.qcow2")
    data = os.path.join(d, who, "t.data")
    uqtest.qemu_create(img, "1M", data_file=data, **opts)
    uqtest.qemu_io("qcow2", img, build)
    return img


def compare_map(what, qimg, oimg, d):
    """map and map --output=json of @oimg by us == of @qimg by qemu-img
    (their paths differ in the directory, q/ or o/, only)."""
    for args in ([], ["--output=json"]):
        theirs = uqtest.qemu_img("map", *args, qimg).stdout
        p = uqtest.uq("map", *args, oimg, check=False)
        if p.returncode != 0:
            return f"{what}: map {' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}"
        err = text_diff(f"{what}: map {' '.join(args)}",
                        theirs.replace(os.path.join(d, "q"), "DIR"),
                        p.stdout.replace(os.path.join(d, "o"), "DIR"))
        if err:
            return err
    return None


def case_datafile_el2_offset0(d):
    build = ["write -P 1 1k 1k", "write -P 2 64k 64k", "write -P 3 136k 3k",
             "write -z 200k 16k"]
    ops = ["write -P 9 5k 2k", "write -z 0 16k", "write -z -u 64k 16k", "discard 128k 16k",
           "write -z 16k 4k", "write -P 8 30k 4k"]
    for opts in ({"extended_l2": "on", "cluster_size": "16k"},
                 {"extended_l2": "on"},
                 {"extended_l2": "off", "cluster_size": "16k"}):
        tag = ",".join(f"{k}={v}" for k, v in opts.items())
        sub = os.path.join(d, tag.replace(",", "_").replace("=", "-"))
        qimg = datafile_image(sub, "q", opts, build)
        oimg = datafile_image(sub, "o", opts, build)
        err = compare_map(f"{tag}, as qemu-io wrote it", qimg, oimg, sub)
        if err:
            return err
        theirs, ours = os.path.join(sub, "q.raw"), os.path.join(sub, "o.raw")
        uqtest.qemu_img("convert", "-O", "raw", qimg, theirs)
        p = uqtest.uq("convert", "-O", "raw", oimg, ours, check=False)
        if p.returncode != 0:
            return f"{tag}: convert -O raw: exit {p.returncode}: {p.stderr.strip()}"
        err = uqtest.file_mismatch(ours, theirs, "qemu-img convert")
        if err:
            return f"{tag}: convert -O raw: {err}"
        # Each op alone, so that a difference names the op.
        for op in ops:
            uqtest.qemu_io("qcow2", qimg, [op])
            p = uqtest.uq("io", oimg, "-c", op, check=False)
            if p.returncode != 0:
                return f"{tag}: io -c '{op}': exit {p.returncode}: {p.stderr.strip()}"
            err = compare_map(f"{tag}, after '{op}'", qimg, oimg, sub)
            if err:
                return err
            err = uqtest.compare_clean(f"{tag}, after '{op}'", qimg, oimg)
            if err:
                return err
    return None


def luks_opts(path):
    return ["--object", f"secret,id=s0,data={PW}", "--image-opts",
            f"driver=qcow2,file.filename={path},encrypt.key-secret=s0"]


def qemu_io_luks(path, cmds):
    uqtest.run(["qemu-io", *luks_opts(path)[:-1]] + sum((["-c", c] for c in cmds), []) +
               [luks_opts(path)[-1]])


def case_luks_compressed(d):
    obj = ["--object", f"secret,id=s0,data={PW}"]
    build = ["write -c -P 0x61 0 64k", "write -c -P 0x62 64k 64k", "write -P 0x63 200k 8k",
             "write -c -P 0x64 256k 64k"]
    ops = ["write -P 9 5k 2k", "write -z 64k 4k", "discard 256k 64k", "write -P 8 120k 20k"]
    for opts in ("cluster_size=64k", "extended_l2=on,cluster_size=64k"):
        imgs = []
        for who in ("q", "o"):
            img = os.path.join(d, f"{who}.qcow2")
            uqtest.qemu_img_luks("create", "-q", "-f", "qcow2", *obj, "-o",
                                 "encrypt.format=luks,encrypt.key-secret=s0,"
                                 f"encrypt.iter-time=10,{opts}", img, "1M")
            qemu_io_luks(img, build)
            imgs.append(img)
        qimg, oimg = imgs
        theirs, ours = os.path.join(d, "q.raw"), os.path.join(d, "o.raw")
        uqtest.qemu_img("convert", *luks_opts(qimg), "-O", "raw", theirs)
        p = uqtest.uq("convert", "--key-secret", PW, "-O", "raw", oimg, ours, check=False)
        if p.returncode != 0:
            return f"{opts}: convert -O raw: exit {p.returncode}: {p.stderr.strip()}"
        err = uqtest.file_mismatch(ours, theirs, "qemu-img convert")
        if err:
            return f"{opts}: convert -O raw: {err}"
        p = uqtest.uq("io", "--key-secret", PW, oimg, "-c", "read -P 0x62 64k 64k", check=False)
        if p.returncode != 0:
            return f"{opts}: io read -P: exit {p.returncode}: {p.stderr.strip()}"
        qemu_io_luks(qimg, ops)
        p = uqtest.uq("io", "--key-secret", PW, oimg, *sum((["-c", c] for c in ops), []),
                      check=False)
        if p.returncode != 0:
            return f"{opts}: io: exit {p.returncode}: {p.stderr.strip()}"
        p = uqtest.qemu_img("compare", *obj, "--image-opts",
                            f"driver=qcow2,file.filename={qimg},encrypt.key-secret=s0",
                            f"driver=qcow2,file.filename={oimg},encrypt.key-secret=s0",
                            check=False)
        if p.returncode != 0:
            return f"{opts}: after io: {(p.stdout + p.stderr).strip()}"
        err = uqtest.qemu_check_clean(f"{opts}: after io", *luks_opts(oimg))
        if err:
            return err
        for f in imgs + [theirs, ours]:
            os.unlink(f)
    raw = os.path.join(d, "src.raw")
    with open(raw, "wb") as f:
        f.write(b"\x65" * (256 << 10))
    for who, run in (("qemu-img", uqtest.qemu_img), ("ours", uqtest.uq)):
        dst = os.path.join(d, f"c-{who}.qcow2")
        p = run("convert", "-c", *obj, "-O", "qcow2", "-o",
                "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", raw, dst,
                check=False)
        if who == "qemu-img" and p.returncode != 1:
            return f"qemu-img convert -c to LUKS exits {p.returncode}; the case is wrong"
        if who == "ours":
            lines = p.stderr.strip().splitlines()
            if p.returncode != 1 or len(lines) != 1 or "c-ours.qcow2" not in lines[0]:
                return (f"convert -c to LUKS: exit {p.returncode}, {p.stderr!r}; "
                        "expected exit 1 and one line naming the target")
            if os.path.exists(dst):
                return "convert -c to LUKS: refused but left the target behind"
    return None


def case_convert_el2_order(d):
    base = os.path.join(d, "base.raw")
    uqtest.qemu_img("create", "-q", "-f", "raw", base, "2M")
    uqtest.qemu_io("raw", base, ["write -P 5 0 2M"])
    mid = os.path.join(d, "mid.qcow2")
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.raw",
                    "-F", "raw", mid, "3M", cwd=d)
    uqtest.qemu_io("qcow2", mid, ["write -P 6 64k 300k", "write -P 7 1M 512k"])
    top = os.path.join(d, "top.qcow2")
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "mid.qcow2",
                    "-F", "qcow2", top, "4M", cwd=d)
    uqtest.qemu_io("qcow2", top, ["write -P 1 1k 1k", "write -P 2 30k 40k", "write -z 100k 3k",
                                  "write -P 3 140k 2k", "write -P 4 3000k 200k"])
    for opts in ("extended_l2=on,cluster_size=16k", "extended_l2=on,cluster_size=64k"):
        maps = []
        for who, run in (("q", uqtest.qemu_img), ("o", uqtest.uq)):
            dst = os.path.join(d, f"{who}.qcow2")
            run("convert", "-O", "qcow2", "-o", opts, top, dst)
            maps.append(uqtest.qemu_img("map", "--output=json", dst).stdout)
        err = text_diff(f"convert -o {opts}: map of the result", *maps)
        if err:
            return err
        err = uqtest.compare_clean(f"convert -o {opts}", top, dst)
        if err:
            return err
    return None


def case_datafile_raw_discard(d):
    build = ["write -P 1 0 64k", "write -P 2 64k 64k", "write -P 3 900k 100k",
             "write -P 4 300k 3k"]
    ops = ["discard 0 4k", "discard 32k 64k", "discard 256k 64k", "discard 960k 40k",
           "discard 4k 200k", "discard 0 1000k"]
    for opts in ({"data_file_raw": "on"}, {"data_file_raw": "on", "extended_l2": "on"},
                 {"data_file_raw": "on", "extended_l2": "on", "cluster_size": "16k"}):
        tag = ",".join(f"{k}={v}" for k, v in opts.items())
        sub = os.path.join(d, tag.replace(",", "_").replace("=", "-"))
        imgs = []
        for who in ("q", "o"):
            os.makedirs(os.path.join(sub, who))
            img = os.path.join(sub, who, "t.qcow2")
            uqtest.qemu_create(img, "1000k", data_file=os.path.join(sub, who, "t.data"), **opts)
            uqtest.qemu_io("qcow2", img, build)
            imgs.append(img)
        # One after another on the same pair, each compared.
        for op in ops:
            uqtest.qemu_io("qcow2", imgs[0], [op])
            p = uqtest.uq("io", imgs[1], "-c", op, check=False)
            if p.returncode != 0:
                return f"{tag}: io -c '{op}': exit {p.returncode}: {p.stderr.strip()}"
            err = uqtest.compare_clean(f"{tag}, after '{op}'", *imgs)
            if err:
                return err
    return None


def case_luks_backing_info(d):
    obj = ["--object", f"secret,id=s0,data={PW}"]
    base = os.path.join(d, "base.qcow2")
    uqtest.qemu_create(base, "4M")
    img = os.path.join(d, "top.qcow2")
    uqtest.qemu_img_luks("create", "-q", "-f", "qcow2", *obj, "-o",
                         "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,"
                         "extended_l2=on", "-b", "base.qcow2", "-F", "qcow2", img, "4M",
                         cwd=d)
    for args in (["--output=json"], ["--backing-chain", "--output=json"], [],
                 ["--backing-chain"]):
        theirs = uqtest.qemu_img("info", *args, img).stdout
        p = uqtest.uq("info", *args, img, check=False)
        if p.returncode != 0:
            return f"info {' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}"
        err = text_diff(f"info {' '.join(args)}", theirs, p.stdout)
        if err:
            return err
        if "--output=json" in args:
            json.loads(p.stdout)
    return None


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    res = uqtest.Results("test_combos")
    res.each_in_scratch("combos", (
        ("datafile-el2-offset0", case_datafile_el2_offset0),
        ("luks-compressed", case_luks_compressed),
        ("convert-el2-order", case_convert_el2_order),
        ("datafile-raw-discard", case_datafile_raw_discard),
        ("luks-backing-info", case_luks_backing_info),
    ))
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
