#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""`ublk-qcow2 check` must agree with `qemu-img check` on clean, leaky and
corrupted images: the same exit code (0 clean, 2 corruptions, 3 leaks only)
and the same "corruptions" / "leaks" / "check-errors" counts in
--output=json.  The damage is done in python on images qemu-io filled.

Repairs: on leaky images `check -r leaks` and `-r all` must leave an image
that qemu-img check calls clean, with the guest data unchanged; on
corrupted images `-r all` must repair at least as much as qemu-img's
`-r all` does (so: clean wherever qemu-img gets it clean, with the same
guest data), and the exit code of our repair must describe what is left.

Where qemu-img's numbers come from an accident of its implementation they
are not demanded (counts=False below, with the reason):
  l1-misaligned   qemu-img reads the L2 table at the unaligned offset anyway
                  and counts the garbage it finds there as more corruptions;
                  we require only that corruption is reported (exit 2).  Its
                  `-r all` then "repairs" that garbage in place (rewriting
                  bytes at the unaligned offset, inside the real L2 table),
                  so the repair is not measured against qemu-img's either:
                  only our exit code must describe what is left.
"""

import json
import os
import shutil
import sys

import uqtest
from qcow2img import Image, OFFSET_MASK

BASES = [
    ("c64k-rb16-v3", dict(cluster_size=65536, refcount_bits=16, compat="1.1")),
    ("c4k-rb1-v3", dict(cluster_size=4096, refcount_bits=1, compat="1.1")),
    ("c64k-v2", dict(cluster_size=65536, compat="0.10")),
]
FILL = ["write -P 0x11 0 256k", "write -P 0x22 8M 64k", "write -P 0x33 40M 128k",
        "write -z 48M 64k", "write -P 0x44 63M 1M"]
KEYS = ("corruptions", "leaks", "check-errors")


def data_cluster(img, n=1):
    return img.data_clusters()[n]


def drop_l2_ref(img):
    img.set_u64(data_cluster(img)[1], 0)


def drop_three_l2_refs(img):
    for i in (1, 2, 3):
        img.set_u64(data_cluster(img, i)[1], 0)


def append_cluster(img):
    size = os.path.getsize(img.path)
    with open(img.path, "r+b") as f:
        f.truncate(size + img.cluster_size)
    img.set_refcount(size, 1)


def refcount_zero(img):
    img.set_refcount(data_cluster(img)[2], 0)


def refcount_two(img):
    img.set_refcount(data_cluster(img)[2], 2)


def l2_table_refcount_zero(img):
    img.set_refcount(img.l1()[0] & OFFSET_MASK, 0)


def l2_entry_misaligned(img):
    e = data_cluster(img)[1]
    img.set_u64(e, img.u64(e) + 512)


def l1_entry_misaligned(img):
    img.set_u64(img.l1_entry_off(0), img.l1()[0] + 512)


# name -> (damage or None, kind, compare counts)
CASES = {
    "clean": (None, "clean", True),
    "leak-dropped-l2-ref": (drop_l2_ref, "leaks", True),
    "leak-three-dropped-l2-refs": (drop_three_l2_refs, "leaks", True),
    "leak-appended-cluster": (append_cluster, "leaks", True),
    "corrupt-data-refcount-zero": (refcount_zero, "corrupt", True),
    "corrupt-data-refcount-two": (refcount_two, "corrupt", True),
    "corrupt-l2-table-refcount-zero": (l2_table_refcount_zero, "corrupt", True),
    "corrupt-l2-entry-misaligned": (l2_entry_misaligned, "corrupt", True),
    "corrupt-l1-entry-misaligned": (l1_entry_misaligned, "corrupt", False),
}


def exit_class(counts):
    if counts.get("corruptions", 0) or counts.get("check-errors", 0):
        return 2
    if counts.get("leaks", 0):
        return 3
    return 0


def parse(p, who):
    try:
        j = json.loads(p.stdout)
    except ValueError:
        raise AssertionError(f"{who} --output=json printed no JSON (exit {p.returncode}):\n"
                             f"{uqtest.tail(p.stdout, 5)}{uqtest.tail(p.stderr, 5)}")
    return {k: j.get(k, 0) for k in KEYS}, j


def qemu_check(path, *extra):
    p = uqtest.qemu_img("check", *extra, "--output=json", path, check=False)
    if extra:		# after a repair the JSON describes what is left
        return p.returncode, parse(p, "qemu-img check")[0] if p.stdout.strip() else None
    return p.returncode, parse(p, "qemu-img check")[0]


def our_check(path, *extra):
    p = uqtest.uq("check", *extra, "--output=json", path, check=False)
    return p.returncode, parse(p, "ublk-qcow2 check")[0], p


def same_data(a, b):
    p = uqtest.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", a, b, check=False)
    return None if p.returncode == 0 else (p.stdout + p.stderr).strip()


def one_case(d, base, name, damage, kind, counts):
    img = os.path.join(d, "img.qcow2")
    shutil.copyfile(base, img)
    if damage:
        damage(Image(img))
    errs = []

    q_rc, q = qemu_check(img)
    expect = {"clean": 0, "leaks": 3, "corrupt": 2}[kind]
    if q_rc != expect:		# the damage did not do what the case says
        return f"test setup: qemu-img check exits {q_rc} on this image, expected {expect}: {q}"
    before = uqtest.sha256(img)
    u_rc, u, p = our_check(img)
    if u_rc != q_rc:
        errs.append(f"check --output=json: exit {u_rc}, qemu-img check exits {q_rc}")
    if counts and u != q:
        errs.append(f"check --output=json: counts {u}, qemu-img check: {q}")
    if not counts and not u["corruptions"]:
        errs.append(f"check --output=json reports no corruption: {u}")
    p = uqtest.uq("check", img, check=False)
    if p.returncode != q_rc:
        errs.append(f"check (text output): exit {p.returncode}, qemu-img check exits {q_rc}")
    if uqtest.sha256(img) != before:
        errs.append("check without -r changed the image")
    if kind == "clean":
        return "\n".join(errs) or None

    for mode in ("leaks", "all"):
        if kind == "corrupt" and mode == "leaks":
            continue	# not a leak repair's job; qemu-img itself refuses some
        ours = os.path.join(d, f"ours-{mode}.qcow2")
        theirs = os.path.join(d, f"theirs-{mode}.qcow2")
        shutil.copyfile(img, ours)
        shutil.copyfile(img, theirs)
        qemu_check(theirs, "-r", mode)
        p = uqtest.uq("check", "-r", mode, ours, check=False)
        t_rc, t = qemu_check(theirs)
        a_rc, a = qemu_check(ours)
        what = f"check -r {mode}"
        if counts and any(a[k] > t[k] for k in KEYS):
            errs.append(f"{what}: qemu-img check afterwards finds {a}; "
                        f"after qemu-img's own repair: {t}")
        if p.returncode != exit_class(a):
            errs.append(f"{what}: exit {p.returncode}, but qemu-img check afterwards "
                        f"finds {a} (exit class {exit_class(a)})")
        if kind == "leaks":
            diff = same_data(img, ours)
            if diff:
                errs.append(f"{what} changed the guest data: {diff}")
        elif counts and t_rc == 0 and a_rc == 0:
            diff = same_data(theirs, ours)
            if diff:
                errs.append(f"{what}: guest data differs from qemu-img's repair: {diff}")
    return "\n".join(errs) or None


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    res = uqtest.Results("test_check_agrees")
    d = uqtest.scratch_dir("check")
    try:
        for bname, opts in BASES:
            base = os.path.join(d, f"base-{bname}.qcow2")
            uqtest.qemu_create(base, "64M", **opts)
            uqtest.qemu_io("qcow2", base, FILL)
            for name, (damage, kind, counts) in CASES.items():
                case = f"{bname}: {name}"
                if damage is refcount_two and opts.get("refcount_bits") == 1:
                    res.skip(case, "a 1-bit refcount cannot hold 2")
                    continue
                res.case(case, one_case, d, base, name, damage, kind, counts)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
