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
            p = uqtest.qemu_img("compare", qimg, oimg, check=False)
            if p.returncode != 0:
                return f"{tag}, after '{op}': {(p.stdout + p.stderr).strip()}"
            err = uqtest.qemu_check_clean(f"{tag}, after '{op}'", oimg)
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
        ("luks-backing-info", case_luks_backing_info),
    ))
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
