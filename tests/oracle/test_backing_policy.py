#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Backing files of untrusted images.

  fmt-raw-not-probed   a backing file that holds a qcow2 image, named with
                       backing_fmt=raw, is read as raw bytes (the qcow2 header
                       shows through), as qemu-img reads it
  no-fmt-probed        without backing_fmt the backing file's format is probed
                       (qemu does so): the same qcow2 backing file is read as
                       qcow2
  fmt-unsupported      backing_fmt=vmdk: one error line, nothing opened
  chain-deep-ok        a chain of 20 qcow2 images reads as qemu-img reads it
  chain-too-long       a chain of 70 images: one error line naming the limit
  no-backing-*         --no-backing (io, io --overlay, convert, map): an image
                       naming a backing file fails with one line naming the
                       file and the backing file, and the backing file is
                       never opened: it is a FIFO, which an open would block on
                       (the command would time out); images without a backing
                       file work as before, and --overlay over one works
Every refusal leaves every file byte for byte as it was.
"""

import json
import os
import struct
import sys

import uqtest
import qcow2img

EXT_BACKING_FMT = 0xE2792ACA

MiB = 1 << 20
TIMEOUT = 60


def convert_equal(d, img, what):
    """None if our convert -O raw of @img equals qemu-img's."""
    ours, theirs = os.path.join(d, "ours.raw"), os.path.join(d, "theirs.raw")
    uqtest.uq("convert", "-O", "raw", img, ours, timeout=TIMEOUT)
    uqtest.qemu_img("convert", "-O", "raw", img, theirs)
    diff = uqtest.first_difference(ours, theirs)
    return f"{what}: {diff}" if diff else None


def expect_error(args, files, needles):
    before = [uqtest.sha256(f) for f in files]
    p = uqtest.uq(*args, check=False, timeout=TIMEOUT, input="")
    if p.returncode != 1:
        return f"{args[0]}: exit {p.returncode}, expected 1\n{uqtest.tail(p.stderr, 4)}"
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    if len(lines) != 1:
        return f"{args[0]}: {len(lines)} lines on stderr, expected one:\n{p.stderr}"
    for n in needles:
        if n not in lines[0]:
            return f"{args[0]}: the error line does not name {n!r}: {lines[0]!r}"
    if [uqtest.sha256(f) for f in files] != before:
        return f"{args[0]}: a file changed"
    return None


def qcow2_backing(d):
    """A qcow2 image with data, to be named as a backing file."""
    b = os.path.join(d, "inner.qcow2")
    uqtest.qemu_create(b, 4 * MiB)
    uqtest.qemu_io("qcow2", b, ["write -P 0x77 0 64k"])
    return b


def overlay(d, name, backing, fmt, size=None):
    """@name over @backing recorded with backing format @fmt (None: no
    backing format extension: qemu-img 7.2 needs -F, so the extension is
    renamed afterwards to a type both qemu and we ignore)."""
    top = os.path.join(d, name)
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", os.path.basename(backing),
                    "-F", fmt or "qcow2", top, str(size or 4 * MiB))
    if not fmt:
        img = qcow2img.Image(top)
        exts = [(0x75710001 if t == EXT_BACKING_FMT else t, data)
                for t, data in img.extensions()]
        if [t for t, _ in exts] == [t for t, _ in img.extensions()]:
            raise ValueError("no backing format extension to rename")
        hl = img.h["header_length"]
        buf = bytearray(img.pread(hl, img.h["backing_file_offset"] - hl))
        off = 0
        for t, data in exts:
            struct.pack_into(">II", buf, off, t, len(data))
            off += 8 + ((len(data) + 7) & ~7)
        img.pwrite(hl, bytes(buf))
        info = json.loads(uqtest.qemu_img("info", "--output=json", top).stdout)
        if "backing-filename-format" in info:
            raise ValueError("qemu-img still sees a backing format")
    return top


def case_fmt_raw(d):
    b = qcow2_backing(d)
    top = overlay(d, "raw-over.qcow2", b, "raw", os.path.getsize(b))
    return convert_equal(d, top, "backing_fmt=raw")


def case_no_fmt(d):
    b = qcow2_backing(d)
    top = overlay(d, "probe-over.qcow2", b, None)
    err = convert_equal(d, top, "no backing_fmt")
    if err:
        return err
    p = uqtest.uq("io", "-r", top, "-c", "read -P 0x77 0 64k", check=False, timeout=TIMEOUT)
    return None if p.returncode == 0 else f"the probed qcow2 backing file is not read as qcow2"


def case_fmt_unsupported(d):
    b = qcow2_backing(d)
    top = overlay(d, "vmdk-over.qcow2", b, "vmdk")
    return expect_error(["io", "-r", top, "-c", "read 0 4k"], [top, b], ["vmdk"])


def chain(d, n):
    prev = os.path.join(d, f"c{n}-0.qcow2")
    uqtest.qemu_create(prev, 4 * MiB)
    uqtest.qemu_io("qcow2", prev, ["write -P 0x42 0 4k"])
    files = [prev]
    for i in range(1, n):
        cur = os.path.join(d, f"c{n}-{i}.qcow2")
        uqtest.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", os.path.basename(prev),
                        "-F", "qcow2", cur, str(4 * MiB))
        files.append(cur)
        prev = cur
    return files


def case_chain_deep(d):
    files = chain(d, 20)
    return convert_equal(d, files[-1], "a 20-image chain")


def case_chain_too_long(d):
    files = chain(d, 70)
    top = os.path.basename(files[-1])
    for args in (["io", "-r", files[-1], "-c", "read 0 4k"],
                 ["convert", "-O", "raw", files[-1], os.path.join(d, "long.raw")],
                 ["map", files[-1]]):
        err = expect_error(args, files, [top, "longer than"])
        if err:
            return err
    return None


def fifo_case(d):
    """(top naming a FIFO as its backing file, the FIFO, a plain image)."""
    fifo = os.path.join(d, "never-open.fifo")
    if not os.path.exists(fifo):
        os.mkfifo(fifo)
    top = os.path.join(d, "fifo-over.qcow2")
    if not os.path.exists(top):
        uqtest.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "never-open.fifo",
                        "-F", "raw", top, str(4 * MiB))
    plain = os.path.join(d, "plain.qcow2")
    if not os.path.exists(plain):
        uqtest.qemu_create(plain, 4 * MiB)
    return top, fifo, plain


def case_no_backing(d, args_fn):
    top, fifo, plain = fifo_case(d)
    out = os.path.join(d, "nb-out.raw")
    err = expect_error(args_fn(top, out), [top], [os.path.basename(top), "never-open.fifo"])
    if err:
        return err
    p = uqtest.uq(*args_fn(plain, out), check=False, timeout=TIMEOUT, input="")
    if p.returncode != 0:
        return f"fails on an image without a backing file: {p.stderr.strip()!r}"
    return None


NO_BACKING = {
    "io": lambda img, out: ["io", "--no-backing", img, "-c", "write 0 4k"],
    "io -r": lambda img, out: ["io", "-r", "--no-backing", img, "-c", "read 0 4k"],
    "io --overlay": lambda img, out: ["io", "--overlay", "--no-backing", img, "-c", "write 0 4k"],
    "convert": lambda img, out: ["convert", "--no-backing", "-O", "raw", img, out],
    "map": lambda img, out: ["map", "--no-backing", img],
}


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    res = uqtest.Results("test_backing_policy")
    d = uqtest.scratch_dir("backing-policy")
    try:
        res.case("fmt-raw-not-probed", case_fmt_raw, d)
        res.case("no-fmt-probed", case_no_fmt, d)
        res.case("fmt-unsupported", case_fmt_unsupported, d)
        res.case("chain-deep-ok", case_chain_deep, d)
        res.case("chain-too-long", case_chain_too_long, d)
        for name, fn in NO_BACKING.items():
            res.case(f"no-backing: {name}", case_no_backing, d, fn)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
