#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""--output=json of info, check and map parses as JSON and agrees with
qemu-img's on every member both print (same names, same values), on images
qemu-img made: plain, compressed, zero clusters, a backing chain, internal
snapshots, extended L2, v2, raw.  A member only one side prints fails
unless ONLY_OURS / ONLY_QEMU lists it with the reason. map must match
qemu-img map's list exactly. (list --output=json needs a ublk device: the
VM scenarios check it.)

-p progress (convert, check, commit, rebase): qemu-img's "    (x.xx/100%)"
lines on stderr, rising to 100.00, stdout the same as without -p, and the
result still passes qemu-img check.
"""

import json
import os
import re
import shutil

import uqtest

# Members qemu-img prints that we do not (and the reverse), each with the
# reason; none so far with qemu-img 7.2. Any other difference in names fails.
ONLY_QEMU = set()
ONLY_OURS = set()


def compare(a, b, path, diffs):
    """Walk @a (ours) and @b (qemu-img's) together; record differing values
    and names present on one side only (except the listed ones)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}"
            if k not in b:
                if k not in ONLY_OURS:
                    diffs.append(f"{p}: only ours prints it ({a[k]!r})")
            elif k not in a:
                if k not in ONLY_QEMU:
                    diffs.append(f"{p}: only qemu-img prints it ({b[k]!r})")
            else:
                compare(a[k], b[k], p, diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{path}: {len(a)} entries vs qemu-img's {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            compare(x, y, f"{path}[{i}]", diffs)
    elif a != b:
        diffs.append(f"{path}: {a!r} vs qemu-img's {b!r}")


def leaves(x):
    """How many scalar values @x holds: a comparison must cover some."""
    if isinstance(x, dict):
        return sum(leaves(v) for v in x.values())
    if isinstance(x, list):
        return sum(leaves(v) for v in x)
    return 1


def both(args, image, cwd):
    ours = uqtest.uq(*args, image, cwd=cwd, check=False)
    theirs = uqtest.qemu_img(*args, image, cwd=cwd, check=False)
    if ours.returncode != theirs.returncode:
        raise AssertionError(f"{' '.join(args)}: exit {ours.returncode} vs qemu-img's "
                             f"{theirs.returncode}: {ours.stderr.strip()}")
    return json.loads(ours.stdout), json.loads(theirs.stdout)


def make_images(d):
    q = uqtest.qemu_img
    io = uqtest.qemu_io
    imgs = []
    uqtest.qemu_create(f"{d}/plain.qcow2", "64M")
    io("qcow2", f"{d}/plain.qcow2", ["write -P 0x11 0 1M", "write -P 0x22 10M 64k",
                                     "write -z 20M 128k", "write -P 0x33 63M 1M"])
    imgs.append("plain.qcow2")
    with open(f"{d}/src.raw", "wb") as f:
        f.truncate(16 << 20)
        f.seek(1 << 20)
        f.write(bytes(range(256)) * 4096)
    q("convert", "-c", "-O", "qcow2", f"{d}/src.raw", f"{d}/comp.qcow2")
    imgs.append("comp.qcow2")
    uqtest.qemu_create(f"{d}/base.qcow2", "32M", cluster_size=4096)
    io("qcow2", f"{d}/base.qcow2", ["write -P 0x41 0 4M", "write -P 0x42 8M 4M"])
    q("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{d}/top.qcow2")
    io("qcow2", f"{d}/top.qcow2", ["write -P 0x43 2M 4M", "write -z 9M 64k"])
    imgs.append("top.qcow2")
    uqtest.qemu_create(f"{d}/snap.qcow2", "16M", cluster_size=16384)
    io("qcow2", f"{d}/snap.qcow2", ["write -P 0x51 0 2M"])
    q("snapshot", "-c", "first", f"{d}/snap.qcow2")
    io("qcow2", f"{d}/snap.qcow2", ["write -P 0x52 1M 2M"])
    imgs.append("snap.qcow2")
    q("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
      "-o", "extended_l2=on,cluster_size=64k", f"{d}/extl2.qcow2")
    io("qcow2", f"{d}/extl2.qcow2", ["write -P 0x61 4k 8k", "write -P 0x62 1M 100k"])
    imgs.append("extl2.qcow2")
    uqtest.qemu_create(f"{d}/v2.qcow2", "8M", compat="0.10", refcount_bits=16)
    io("qcow2", f"{d}/v2.qcow2", ["write -P 0x71 0 1M"])
    imgs.append("v2.qcow2")
    q("create", "-q", "-f", "raw", f"{d}/disk.raw", "8M")
    imgs.append("disk.raw")
    return imgs


def case_info(d, img, extra):
    ours, theirs = both(["info", "--output=json"] + extra, img, d)
    diffs = []
    compare(ours, theirs, "info", diffs)
    assert leaves(ours) >= 5, f"info printed only {ours!r}"
    if diffs:
        return "; ".join(diffs[:6])


def case_check(d, img):
    ours, theirs = both(["check", "--output=json"], img, d)
    diffs = []
    compare(ours, theirs, "check", diffs)
    assert "check-errors" in ours and "filename" in ours, f"check: {ours!r}"
    if diffs:
        return "; ".join(diffs[:6])


def case_map(d, img):
    ours, theirs = both(["map", "--output=json"], img, d)
    diffs = []
    compare(ours, theirs, "map", diffs)
    assert ours and all("start" in e and "length" in e for e in ours), f"map: {ours!r}"
    if diffs:
        return "; ".join(diffs[:6])


PROGRESS = re.compile(r" {4}\((\d+\.\d\d)/100%\)")


def check_progress(stderr, what):
    """Progress lines rise to 100.00 and nothing else is on stderr."""
    text = stderr.replace("\r", "\n")
    values = []
    for line in text.splitlines():
        if not line:
            continue
        m = PROGRESS.fullmatch(line)
        if not m:
            raise AssertionError(f"{what}: unexpected stderr line {line!r}")
        values.append(float(m.group(1)))
    if not values or values[-1] != 100.0 or values != sorted(values):
        raise AssertionError(f"{what}: progress {values[:5]}...{values[-3:]} does not rise to 100")
    return len(values)


def case_progress(d):
    for name in ("pa.qcow2", "pb.qcow2"):
        uqtest.qemu_create(f"{d}/{name}", "64M", cluster_size=65536)
    uqtest.qemu_io("qcow2", f"{d}/pa.qcow2", [f"write -P {i + 1} {i * 2}M 1M" for i in range(32)])
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-b", "pa.qcow2", "-F", "qcow2", f"{d}/pt.qcow2")
    uqtest.qemu_io("qcow2", f"{d}/pt.qcow2", ["write -P 0x99 1M 3M"])
    steps = {}
    plain = uqtest.uq("convert", "-O", "qcow2", f"{d}/pt.qcow2", f"{d}/c1.qcow2")
    p = uqtest.uq("convert", "-p", "-O", "qcow2", f"{d}/pt.qcow2", f"{d}/c2.qcow2")
    steps["convert"] = check_progress(p.stderr, "convert -p")
    assert p.stdout == plain.stdout, "convert -p changed stdout"
    r = uqtest.qemu_img("compare", "-q", f"{d}/pt.qcow2", f"{d}/c2.qcow2", check=False)
    assert r.returncode == 0, "convert -p wrote other data"
    uqtest.qemu_img("check", "-q", f"{d}/c2.qcow2")
    plain = uqtest.uq("check", f"{d}/c2.qcow2")
    p = uqtest.uq("check", "-p", f"{d}/c2.qcow2")
    steps["check"] = check_progress(p.stderr, "check -p")
    assert p.stdout == plain.stdout, "check -p changed stdout"
    q = uqtest.uq("check", "-p", "-q", f"{d}/c2.qcow2")
    assert q.stderr == "" and q.stdout == "", "check -p -q printed something"
    shutil.copy(f"{d}/pt.qcow2", f"{d}/pt2.qcow2")
    p = uqtest.uq("rebase", "-p", "-b", "pb.qcow2", "-F", "qcow2", f"{d}/pt2.qcow2", cwd=d)
    steps["rebase"] = check_progress(p.stderr, "rebase -p")
    uqtest.qemu_img("check", "-q", f"{d}/pt2.qcow2")
    r = uqtest.qemu_img("compare", "-q", f"{d}/pt.qcow2", f"{d}/pt2.qcow2", check=False)
    assert r.returncode == 0, "rebase -p changed the content"
    p = uqtest.uq("commit", "-p", f"{d}/pt.qcow2")
    steps["commit"] = check_progress(p.stderr, "commit -p")
    assert p.stdout == "Image committed.\n", f"commit -p stdout {p.stdout!r}"
    uqtest.qemu_img("check", "-q", f"{d}/pa.qcow2")
    r = uqtest.qemu_img("compare", "-q", f"{d}/pa.qcow2", f"{d}/pt2.qcow2", check=False)
    assert r.returncode == 0, "commit -p left other data in the base"
    # rebase and commit copy 64 MiB in 2 MiB chunks: many steps, not just 0 and 100
    for cmd in ("convert", "rebase", "commit"):
        assert steps[cmd] > 3, f"{cmd} -p showed only {steps[cmd]} steps"
    print(f"      progress lines: {steps}")


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    res = uqtest.Results("json_output")
    d = uqtest.scratch_dir("json")
    try:
        imgs = make_images(d)
        for img in imgs:
            res.case(f"info {img}", case_info, d, img, [])
            res.case(f"map {img}", case_map, d, img)
            if img.endswith(".qcow2"):
                res.case(f"check {img}", case_check, d, img)
        res.case("info --backing-chain top.qcow2", case_info, d, "top.qcow2",
                 ["--backing-chain"])
        res.case("progress -p", case_progress, d)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    main()
