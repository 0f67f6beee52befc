#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Seed corpora for the fuzzers, made by qemu-img/qemu-io (small images:
small clusters, small disks) plus the committed regression inputs.

    make_seeds.py OUTDIR     -> OUTDIR/{open,luks,walk,snapshot,write,compress}/
"""

import os
import shutil
import struct
import subprocess
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REGRESSIONS = os.path.join(HERE, "..", "images", "fuzz")


def run(*args):
    # qemu-img's LUKS key derivation times a PBKDF2 benchmark: on a busy
    # machine it fails now and then, so LUKS creates get a few tries
    tries = 5 if any("encrypt.format=luks" in a for a in args) else 1
    for i in range(tries):
        try:
            subprocess.run(args, check=True, stdout=subprocess.DEVNULL, input=b"")
            return
        except subprocess.CalledProcessError:
            if i == tries - 1:
                raise
            time.sleep(1)


def create(path, size, opts="", backing=None):
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-u", "-b", backing, "-F", "qcow2"]
    run(*args, path, size)


def fill(path, *cmds):
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    run(*args, path)


def images(d):
    """Write the image seeds into @d; returns their paths by role."""
    out = {}

    def img(name):
        p = os.path.join(d, name)
        out[name] = p
        return p

    p = img("v3-512.qcow2")
    create(p, "1M", "cluster_size=512")
    fill(p, "write -P 1 0 8k", "write -z 64k 4k", "write -P 2 700k 3k")
    p = img("v2-512.qcow2")
    create(p, "1M", "cluster_size=512,compat=0.10")
    fill(p, "write -P 3 0 6k")
    p = img("rc1-4k.qcow2")
    create(p, "2M", "cluster_size=4k,refcount_bits=1")
    fill(p, "write -P 4 0 16k")
    p = img("rc64-4k.qcow2")
    create(p, "2M", "cluster_size=4k,refcount_bits=64,lazy_refcounts=on")
    fill(p, "write -P 5 4k 8k")
    p = img("extl2-16k.qcow2")
    create(p, "1M", "cluster_size=16k,extended_l2=on")
    fill(p, "write -P 6 1k 2k", "write -z 40k 1k")
    p = img("snap-512.qcow2")
    create(p, "1M", "cluster_size=512")
    fill(p, "write -P 7 0 4k")
    run("qemu-img", "snapshot", "-c", "first", p)
    fill(p, "write -P 8 1k 2k")
    run("qemu-img", "snapshot", "-c", "second", p)
    p = img("backing-512.qcow2")
    create(p, "1M", "cluster_size=512", backing="base.qcow2")
    raw = os.path.join(d, "plain.raw")
    with open(raw, "wb") as f:
        f.write(bytes(range(256)) * 64 + b"\0" * 16384 + b"\xaa" * 32768)
    for ctype in ("zlib", "zstd"):
        p = img(f"compressed-{ctype}.qcow2")
        run("qemu-img", "convert", "-c", "-O", "qcow2", "-o",
            f"cluster_size=4k,compression_type={ctype}", raw, p)
    os.unlink(raw)
    p = img("luks-512.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=pw",
        "-o", "cluster_size=512,encrypt.format=luks,encrypt.key-secret=s,"
        "encrypt.cipher-alg=aes-128,encrypt.iter-time=10", p, "1M")
    return out


def compress_seeds(d):
    """Raw deflate and zstd streams of one cluster; byte 0 picks the cluster
    size (low nibble: cluster_bits - 9) and the type (bit 4: zstd)."""
    data = bytes(range(256)) * 16
    co = zlib.compressobj(6, zlib.DEFLATED, -12, 9)
    streams = [(3, co.compress(data) + co.flush())]		# 4 KiB, zlib
    if shutil.which("zstd"):
        p = subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True)
        streams.append((0x13, p.stdout))			# 4 KiB, zstd
    for i, (sel, s) in enumerate(streams):
        with open(os.path.join(d, f"stream-{i}"), "wb") as f:
            f.write(struct.pack("B", sel) + s)


def main(argv):
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUTDIR", file=sys.stderr)
        return 2
    top = argv[1]
    shutil.rmtree(top, ignore_errors=True)
    tmp = os.path.join(top, "images")
    os.makedirs(tmp)
    imgs = images(tmp)
    roles = {
        "open": [n for n in imgs if not n.startswith("luks")],
        "luks": ["luks-512.qcow2"],
        "walk": [n for n in imgs if not n.startswith("luks")],
        "snapshot": ["snap-512.qcow2", "v3-512.qcow2"],
        "write": [n for n in imgs if not n.startswith("luks")],
    }
    regress = sorted(os.listdir(REGRESSIONS)) if os.path.isdir(REGRESSIONS) else []
    for role, names in roles.items():
        rd = os.path.join(top, role)
        os.makedirs(rd)
        for n in names:
            shutil.copyfile(imgs[n], os.path.join(rd, n))
        for n in regress:
            if n.startswith(role + "-"):
                shutil.copyfile(os.path.join(REGRESSIONS, n), os.path.join(rd, n))
    os.makedirs(os.path.join(top, "compress"))
    compress_seeds(os.path.join(top, "compress"))
    shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
