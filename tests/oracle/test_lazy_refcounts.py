#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""lazy_refcounts=on: `ublk-qcow2 create` must write what `qemu-img create`
writes (the compatible bit, byte for byte), refuse it on compat=0.10 as
qemu-img does, and such images (ours, or qemu's, or one QEMU left dirty by
dying mid-write) must open read-write, take our writes and pass `qemu-img
check` with no errors and no leaks, agreeing with a raw mirror.
"""

import json
import os

import uqtest

MiB = 1 << 20

WRITES = ["write -P 0x11 0 1M", "write -P 0x22 10M 3M", "write -z 10M 64k",
          "write -P 0x33 63M 1M"]


def io_args(cmds):
    return [a for c in cmds for a in ("-c", c)]


def check_clean(path):
    p = uqtest.qemu_img("check", path, check=False)
    if p.returncode != 0 or "No errors were found" not in p.stdout:
        raise AssertionError(f"qemu-img check {path} (exit {p.returncode}):\n"
                             f"{p.stdout}{p.stderr}")


def lazy_and_clean(path):
    info = json.loads(uqtest.qemu_img("info", "--output=json", path).stdout)
    data = info["format-specific"]["data"]
    if not data.get("lazy-refcounts"):
        raise AssertionError(f"{path}: lazy refcounts off in qemu-img info")
    with open(path, "rb") as f:
        f.seek(72)
        incompat = int.from_bytes(f.read(8), "big")
    if incompat & 1:
        raise AssertionError(f"{path}: dirty bit left set after close")


def case_create(cluster):
    d = uqtest.scratch_dir("lazy")
    try:
        ours, ref = os.path.join(d, "ours.qcow2"), os.path.join(d, "ref.qcow2")
        opts = f"lazy_refcounts=on,cluster_size={cluster}"
        uqtest.uq("create", "-o", opts, ours, "64M")
        uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", opts, ref, "64M")
        diff = uqtest.first_difference(ours, ref)
        if diff:
            return f"not what qemu-img creates: {diff}"
        mirror = os.path.join(d, "mirror.raw")
        uqtest.qemu_img("create", "-q", "-f", "raw", mirror, "64M")
        uqtest.uq("io", ours, *io_args(WRITES))
        uqtest.qemu_io("raw", mirror, WRITES)
        check_clean(ours)
        lazy_and_clean(ours)
        uqtest.qemu_img("compare", "-f", "raw", "-F", "qcow2", mirror, ours)
        # qemu-io and we take turns.
        more = ["write -P 0x44 5M 2M", "discard 10M 1M"]
        uqtest.qemu_io("qcow2", ours, more)
        uqtest.qemu_io("raw", mirror, [m.replace("discard", "write -z") for m in more])
        uqtest.uq("io", ours, *io_args(["write -P 0x55 6M 4k"]))
        uqtest.qemu_io("raw", mirror, ["write -P 0x55 6M 4k"])
        check_clean(ours)
        uqtest.qemu_img("compare", "-f", "raw", "-F", "qcow2", mirror, ours)
    finally:
        uqtest.cleanup(d)


def case_dirty():
    """QEMU dies with lazy refcounts pending: we repair on open and write on."""
    d = uqtest.scratch_dir("lazy")
    try:
        img, mirror = os.path.join(d, "img.qcow2"), os.path.join(d, "mirror.raw")
        uqtest.qemu_create(img, 64 * MiB, lazy_refcounts="on")
        uqtest.qemu_img("create", "-q", "-f", "raw", mirror, "64M")
        uqtest.qemu_io("qcow2", img, WRITES + ["abort"], check=False)
        with open(img, "rb") as f:
            f.seek(72)
            if not int.from_bytes(f.read(8), "big") & 1:
                return "qemu-io abort left no dirty image (the test would prove nothing)"
        uqtest.qemu_io("raw", mirror, WRITES)
        uqtest.uq("io", img, *io_args(["write -P 0x66 20M 1M"]))
        uqtest.qemu_io("raw", mirror, ["write -P 0x66 20M 1M"])
        check_clean(img)
        lazy_and_clean(img)
        uqtest.qemu_img("compare", "-f", "raw", "-F", "qcow2", mirror, img)
    finally:
        uqtest.cleanup(d)


def case_v2_refused():
    d = uqtest.scratch_dir("lazy")
    try:
        img = os.path.join(d, "v2.qcow2")
        p = uqtest.uq("create", "-o", "compat=0.10,lazy_refcounts=on", img, "1M", check=False)
        q = uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o",
                            "compat=0.10,lazy_refcounts=on", img + ".ref", "1M", check=False)
        if q.returncode == 0:
            return "qemu-img accepted lazy refcounts on compat=0.10 (oracle changed?)"
        if p.returncode == 0 or len(p.stderr.strip().splitlines()) != 1:
            return f"not refused with one error line (exit {p.returncode}): {p.stderr}"
        if os.path.exists(img):
            return "a refused create left a file behind"
    finally:
        uqtest.cleanup(d)
    return None


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    res = uqtest.Results("test_lazy_refcounts")
    for cluster in (4096, 65536):
        res.case(f"create and write, c{cluster}", case_create, cluster)
    res.case("dirty image left by QEMU", case_dirty)
    res.case("compat=0.10 refused", case_v2_refused)
    res.finish()


if __name__ == "__main__":
    main()
