#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Backing chains against qemu-img and qemu-io.

The chain, made by qemu-img and filled by qemu-io (seeded), four levels deep
with three cluster sizes, relative backing names across directories and a
raw base shorter than the images above it:

    top.qcow2 (64k) -> mid/l2.qcow2 (4k) -> base/l1.qcow2 (2M) -> base/base.raw

Cases:
  read            `convert -O raw` of the top equals qemu-img's
  create          `create -b` (relative name, size from the backing file) gives
                  what qemu-img create gives: the same file byte for byte
  random-io       seeded writes / write-zeroes / discards through `io` on the
                  top equal qemu-io's on a raw mirror; no backing file changes
  rebase-*        -u and safe rebase (onto a deeper qcow2, onto the raw base,
                  onto nothing) on a copy, qemu-img rebase on another copy:
                  content (qemu-img convert) and the backing fields of qemu-img
                  info agree, and safe rebase keeps the content
  commit-*        commit (into qcow2, into a raw file that must grow, -b into
                  a deeper image, -d) on a copy of the chain, qemu-img commit on
                  another: the base byte for byte, the top's content unchanged
                  and emptied as qemu-img empties it (nothing allocated)
  info-chain      info --backing-chain, text exactly and json field by field
  overlay         io --overlay writes nothing to the chain and leaves no file,
                  even when killed with SIGKILL while running
  bad-*           missing backing file, a backing loop (made with qemu-img
                  rebase -u), rebase onto a missing file or onto a name that
                  does not fit in the header, commit without a backing file or
                  into an image outside the chain: exit 1, one
                  line naming the file, every file unchanged (sha256)
Every image we wrote passes qemu-img check with no errors and no leaks.

  UQ_SEED=N   seed (default 1)
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import uqtest

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB
BASE_SIZE = 6 * MiB
TIMEOUT = 120

# (path in the chain directory, format, cluster size, backing name as stored, its format)
LEVELS = [
    ("base/base.raw", "raw", None, None, None),
    ("base/l1.qcow2", "qcow2", 2 * MiB, "base.raw", "raw"),
    ("mid/l2.qcow2", "qcow2", 4 * KiB, "../base/l1.qcow2", "qcow2"),
    ("top.qcow2", "qcow2", 64 * KiB, "mid/l2.qcow2", "qcow2"),
]
TOP = "top.qcow2"


def fill_ops(rng, size, cluster, n):
    ops = []
    for _ in range(n):
        r = rng.random()
        length = rng.randint(1, 256) * 512 if rng.random() < 0.8 else rng.randint(1, 2048) * 512
        off = rng.randint(0, (size - length) // 512) * 512
        if r < 0.65:
            ops.append(f"write -P {rng.randint(1, 255):#x} {off} {length}")
        elif r < 0.85:
            ops.append(f"write -z {off} {length}")
        else:
            nr = rng.randint(1, max(1, MiB // cluster))
            off = rng.randint(0, size // cluster - nr) * cluster
            ops.append(f"discard {off} {nr * cluster}")
    return ops


def make_chain(d, seed):
    rng = random.Random(seed)
    for lvl, (path, fmt, cluster, backing, bfmt) in enumerate(LEVELS):
        p = os.path.join(d, path)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if fmt == "raw":
            uqtest.qemu_img("create", "-q", "-f", "raw", p, BASE_SIZE)
            ops = [o for o in fill_ops(rng, BASE_SIZE, 64 * KiB, 40) if not o.startswith("d")]
        else:
            uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}",
                            "-b", backing, "-F", bfmt, p, SIZE)
            ops = fill_ops(rng, SIZE, cluster, 40)
            # Fixed ops too, so that every level has data at 0 and zeroes
            # data of the levels below: whatever the seed, commit has both.
            ops += [f"write -P {0x10 + lvl:#x} {lvl * 512} 4k",
                    "write -P 0x77 2M 256k",
                    f"write -z {2 * MiB + lvl * 64 * KiB} 64k",
                    f"discard {4 * MiB} {cluster}"]
        uqtest.qemu_io(fmt, p, ops, input="")


def chain_files(d):
    return [os.path.join(d, l[0]) for l in LEVELS]


def hashes(paths):
    return {p: uqtest.sha256(p) for p in paths}


def unchanged(before, what):
    for p, h in before.items():
        if uqtest.sha256(p) != h:
            return f"{what}: {p} changed"
    return None


def qemu_raw(d, img, out):
    uqtest.qemu_img("convert", "-O", "raw", img, out)
    return out


def check_clean(img):
    return uqtest.qemu_check_clean(img, img)


def same_content(a, b, d, what):
    ra = qemu_raw(d, a, os.path.join(d, "cmp-a.raw"))
    rb = qemu_raw(d, b, os.path.join(d, "cmp-b.raw"))
    diff = uqtest.first_difference(ra, rb)
    os.unlink(ra)
    os.unlink(rb)
    return f"{what}: {diff}" if diff else None


def backing_fields(img):
    info = json.loads(uqtest.qemu_img("info", "--output=json", img).stdout)
    return {k: info.get(k) for k in ("virtual-size", "backing-filename",
                                      "backing-filename-format", "full-backing-filename")}


def copy_chain(src, dst):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


# ---- Cases ------------------------------------------------------------------------

def case_read(d, chain):
    want = qemu_raw(d, os.path.join(chain, TOP), os.path.join(d, "want.raw"))
    got = os.path.join(d, "got.raw")
    uqtest.uq("convert", "-O", "raw", os.path.join(chain, TOP), got)
    diff = uqtest.first_difference(want, got)
    os.unlink(got)
    if diff:
        return f"convert -O raw of the top differs from qemu-img's: {diff}"
    # Every level through its own chain, too.
    for path in chain_files(chain)[1:3]:
        uqtest.uq("convert", "-O", "raw", path, got)
        diff = uqtest.first_difference(qemu_raw(d, path, os.path.join(d, "lvl.raw")), got)
        if diff:
            return f"{path}: {diff}"
    return None


def case_create(d, chain):
    ours, theirs = os.path.join(chain, "c-ours.qcow2"), os.path.join(chain, "c-qemu.qcow2")
    try:
        args = ["-f", "qcow2", "-b", "mid/l2.qcow2", "-F", "qcow2"]
        uqtest.uq("create", *args, ours)
        uqtest.qemu_img("create", "-q", *args, theirs)
        a, b = backing_fields(ours), backing_fields(theirs)
        if a != b:
            return f"info fields differ: ours {a}, qemu-img {b}"
        if uqtest.sha256(ours) != uqtest.sha256(theirs):
            return "create -b: the file differs from qemu-img create's"
        err = same_content(ours, theirs, d, "content") or check_clean(ours)
        if err:
            return err
        # Without -F we record the probed format (qemu-img 7.2 refuses instead).
        uqtest.uq("create", "-f", "qcow2", "-b", "base/base.raw", ours)
        f = backing_fields(ours)
        if f["backing-filename-format"] != "raw" or f["virtual-size"] != BASE_SIZE:
            return f"create -b base/base.raw without -F: {f}"
        return check_clean(ours)
    finally:
        for img in (ours, theirs):
            if os.path.exists(img):
                os.unlink(img)


def case_random_io(d, chain, seed):
    work = copy_chain(chain, os.path.join(d, "rio"))
    top = os.path.join(work, TOP)
    mirror = qemu_raw(d, top, os.path.join(d, "mirror.raw"))
    before = hashes(chain_files(work)[:-1])
    rng = random.Random(seed)
    for batch in range(2):
        ops, mops = [], []
        for _ in range(250):
            r = rng.random()
            length = rng.randint(1, 64) * 512 if rng.random() < 0.8 else rng.randint(1, 4096) * 512
            off = rng.randint(0, (SIZE - length) // 512) * 512
            if r < 0.6:
                c = f"write -P {rng.randint(0, 255):#x} {off} {length}"
                ops.append(c)
                mops.append(c)
            elif r < 0.8:
                c = f"write -z {off} {length}"
                ops.append(c)
                mops.append(c)
            elif r < 0.9:
                nr = rng.randint(1, 16)
                off = rng.randint(0, SIZE // (64 * KiB) - nr) * 64 * KiB
                ops.append(f"discard {off} {nr * 64 * KiB}")
                mops.append(f"write -z {off} {nr * 64 * KiB}")
            else:
                ops.append("flush")
        cmdfile = os.path.join(d, f"ops-{batch}.txt")
        with open(cmdfile, "w") as f:
            f.write("".join(o + "\n" for o in ops))
        p = uqtest.uq("io", top, "-C", cmdfile, check=False, timeout=TIMEOUT)
        if p.returncode:
            return f"io batch {batch} exited {p.returncode}: {uqtest.tail(p.stderr, 5)}"
        uqtest.qemu_io("raw", mirror, mops, input="")
        err = check_clean(top)
        if err:
            return err
    got = qemu_raw(d, top, os.path.join(d, "got.raw"))
    diff = uqtest.first_difference(mirror, got)
    if diff:
        return f"the top after our writes differs from qemu-io's mirror: {diff}"
    return unchanged(before, "backing file written by io on the top")


def rebase_pair(d, chain, args, name):
    """Run rebase @args on two copies of the chain, ours and qemu-img's; compare."""
    ours = copy_chain(chain, os.path.join(d, f"rb-ours-{name}"))
    theirs = copy_chain(chain, os.path.join(d, f"rb-qemu-{name}"))
    want = qemu_raw(d, os.path.join(chain, TOP), os.path.join(d, "want.raw"))
    uqtest.uq("rebase", *args, os.path.join(ours, TOP), timeout=TIMEOUT)
    uqtest.qemu_img("rebase", *args, os.path.join(theirs, TOP), input="")
    a, b = backing_fields(os.path.join(ours, TOP)), backing_fields(os.path.join(theirs, TOP))
    for k in ("full-backing-filename",):
        a[k] = a[k] and os.path.relpath(a[k], ours)
        b[k] = b[k] and os.path.relpath(b[k], theirs)
    if a != b:
        return f"qemu-img info differs: ours {a}, qemu-img {b}"
    err = same_content(os.path.join(ours, TOP), os.path.join(theirs, TOP), d,
                       "content after rebase (ours vs qemu-img)")
    if err:
        return err
    if "-u" not in args:
        got = qemu_raw(d, os.path.join(ours, TOP), os.path.join(d, "got.raw"))
        diff = uqtest.first_difference(want, got)
        if diff:
            return f"safe rebase changed the content: {diff}"
    err = check_clean(os.path.join(ours, TOP))
    if err:
        return err
    # Nothing below the top was written.
    for orig, copy in zip(chain_files(chain)[:-1], chain_files(ours)[:-1]):
        if uqtest.sha256(orig) != uqtest.sha256(copy):
            return f"rebase wrote {copy}"
    return None


def case_rebase_safe_no_fmt(d, chain):
    """Without -F our rebase probes the format (qemu-img 7.2 refuses): content kept."""
    ours = copy_chain(chain, os.path.join(d, "rb-nofmt"))
    want = qemu_raw(d, os.path.join(chain, TOP), os.path.join(d, "want.raw"))
    uqtest.uq("rebase", "-b", "base/base.raw", os.path.join(ours, TOP), timeout=TIMEOUT)
    f = backing_fields(os.path.join(ours, TOP))
    if f["backing-filename"] != "base/base.raw" or f["backing-filename-format"] != "raw":
        return f"backing fields after rebase without -F: {f}"
    got = qemu_raw(d, os.path.join(ours, TOP), os.path.join(d, "got.raw"))
    return uqtest.first_difference(want, got) or check_clean(os.path.join(ours, TOP))


def commit_pair(d, chain, args, name, img=TOP, base="mid/l2.qcow2", emptied=True):
    ours = copy_chain(chain, os.path.join(d, f"cm-ours-{name}"))
    theirs = copy_chain(chain, os.path.join(d, f"cm-qemu-{name}"))
    want = qemu_raw(d, os.path.join(chain, img), os.path.join(d, "want.raw"))
    img_before = uqtest.sha256(os.path.join(ours, img))
    # -b names the base relative to the working directory, for both tools.
    a = [os.path.join(ours, x) if x.endswith((".qcow2", ".raw")) else x for x in args]
    b = [os.path.join(theirs, x) if x.endswith((".qcow2", ".raw")) else x for x in args]
    p = uqtest.uq("commit", *a, os.path.join(ours, img), timeout=TIMEOUT)
    if p.stdout != "Image committed.\n":
        return f"commit printed {p.stdout!r}"
    uqtest.qemu_img("commit", "-q", *b, os.path.join(theirs, img), input="")
    ob, tb = os.path.join(ours, base), os.path.join(theirs, base)
    if base.endswith(".raw"):
        diff = uqtest.first_difference(ob, tb)
        if diff:
            return f"raw base after commit differs from qemu-img's: {diff}"
    else:
        err = same_content(ob, tb, d, "base after commit (ours vs qemu-img)") or check_clean(ob)
        if err:
            return err
    got = qemu_raw(d, os.path.join(ours, img), os.path.join(d, "got.raw"))
    diff = uqtest.first_difference(want, got)
    if diff:
        return f"the committed image no longer reads the same through the chain: {diff}"
    err = check_clean(os.path.join(ours, img))
    if err:
        return err
    m = json.loads(uqtest.qemu_img("map", "--output=json", os.path.join(ours, img)).stdout)
    top_left = [e for e in m if e["depth"] == 0 and e["present"]]
    if emptied and top_left:
        return f"the image still has data after commit: {top_left[:2]}"
    if not emptied and uqtest.sha256(os.path.join(ours, img)) != img_before:
        return "commit -d / -b changed the image"
    if emptied and os.path.getsize(os.path.join(ours, img)) != \
            os.path.getsize(os.path.join(theirs, img)):
        return (f"emptied image is {os.path.getsize(os.path.join(ours, img))} bytes, "
                f"qemu-img's {os.path.getsize(os.path.join(theirs, img))}")
    return None


def case_commit_snapshot(d, chain):
    """An internal snapshot of the top keeps its clusters through commit."""
    res = {}
    for who in ("ours", "qemu"):
        c = copy_chain(chain, os.path.join(d, f"cm-snap-{who}"))
        top = os.path.join(c, TOP)
        uqtest.qemu_img("snapshot", "-c", "s1", top)
        uqtest.qemu_io("qcow2", top, ["write -P 0x66 0 256k", "write -z 1M 64k"], input="")
        want = qemu_raw(d, top, os.path.join(d, f"want-{who}.raw"))
        if who == "ours":
            uqtest.uq("commit", top, timeout=TIMEOUT)
        else:
            uqtest.qemu_img("commit", "-q", top, input="")
        err = check_clean(top) or check_clean(os.path.join(c, "mid/l2.qcow2"))
        if err:
            return err
        got = qemu_raw(d, top, os.path.join(d, f"got-{who}.raw"))
        diff = uqtest.first_difference(want, got)
        if diff:
            return f"{who}: the top's content changed: {diff}"
        res[who] = (qemu_raw(d, os.path.join(c, "mid/l2.qcow2"), os.path.join(d, f"b-{who}.raw")),
                    os.path.join(d, f"s-{who}.raw"))
        uqtest.qemu_img("convert", "-l", "s1", "-O", "raw", top, res[who][1])
    for i, what in enumerate(("the base", "the snapshot")):
        diff = uqtest.first_difference(res["ours"][i], res["qemu"][i])
        if diff:
            return f"{what} after commit differs from qemu-img's: {diff}"
    return None


def case_info_chain(d, chain):
    top = os.path.join(chain, TOP)
    ours = uqtest.uq("info", "--backing-chain", top).stdout
    theirs = uqtest.qemu_img("info", "--backing-chain", top).stdout
    if ours != theirs:
        return f"text differs:\n--- ours\n{ours}--- qemu-img\n{theirs}"
    ours = json.loads(uqtest.uq("info", "--backing-chain", "--output=json", top).stdout)
    theirs = json.loads(uqtest.qemu_img("info", "--backing-chain", "--output=json",
                                        top).stdout)
    if not isinstance(ours, list) or len(ours) != len(theirs) or len(ours) != len(LEVELS):
        return f"json: {len(ours)} images, qemu-img {len(theirs)}"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        common = set(a) & set(b)
        if "filename" not in common or "backing-filename" not in common and i < 3:
            return f"json image {i}: fields missing: ours {sorted(a)}, qemu-img {sorted(b)}"
        for k in sorted(common):
            if a[k] != b[k]:
                return f"json image {i} ({b.get('filename')}): {k}: ours {a[k]!r}, " \
                       f"qemu-img {b[k]!r}"
    return None


def case_overlay(d, chain):
    tmp = os.path.join(d, "tmpdir")
    os.makedirs(tmp, exist_ok=True)
    top = os.path.join(chain, TOP)
    before = hashes(chain_files(chain))
    env = {"TMPDIR": tmp}
    uqtest.uq("io", "--overlay", top, "-c", "write -P 0x5a 100k 3M",
              "-c", "read -P 0x5a 100k 3M", "-c", "write -z 6M 1M", "-c", "read -P 0 6M 1M",
              env=env, timeout=TIMEOUT)
    err = unchanged(before, "io --overlay")
    if err:
        return err
    if os.listdir(tmp):
        return f"io --overlay left {os.listdir(tmp)} in TMPDIR"
    # Killed while it runs: blocked opening a command FIFO, overlay open.
    fifo = os.path.join(d, "cmds.fifo")
    os.mkfifo(fifo)
    full_env = dict(os.environ, TMPDIR=tmp)
    p = subprocess.Popen([uqtest.uq_bin(), "io", "--overlay", top, "-c",
                          "write -P 1 0 64k", "-C", fifo], env=full_env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        link = None
        for _ in range(200):
            for fd in os.listdir(f"/proc/{p.pid}/fd"):
                try:
                    t = os.readlink(f"/proc/{p.pid}/fd/{fd}")
                except OSError:
                    continue
                if "ublk-qcow2-overlay" in t:
                    link = t
            if link:
                break
            time.sleep(0.05)
        if not link:
            return "io --overlay: no overlay file open in the running process"
        if not link.endswith("(deleted)") or not link.startswith(tmp):
            return f"io --overlay holds {link!r}: expected an unlinked file in {tmp}"
        if os.listdir(tmp):
            return f"the overlay is visible in TMPDIR while in use: {os.listdir(tmp)}"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        os.unlink(fifo)
    if os.listdir(tmp):
        return f"SIGKILL left {os.listdir(tmp)} in TMPDIR"
    return unchanged(before, "io --overlay (killed)")


# ---- Bad input -------------------------------------------------------------------------

def expect_error(args, files, name_in_line, what):
    before = hashes(files)
    p = uqtest.uq(*args, check=False, timeout=60, input="")
    if p.returncode != 1:
        return f"{what}: exit {p.returncode}, expected 1\n{uqtest.tail(p.stderr, 4)}"
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    if len(lines) != 1:
        return f"{what}: {len(lines)} lines on stderr, expected one:\n{p.stderr}"
    if name_in_line not in lines[0]:
        return f"{what}: the error line does not name {name_in_line!r}: {lines[0]!r}"
    return unchanged(before, what)


def bad_cases(d, chain):
    """[(name, fn)] of the bad-input cases."""
    bad = os.path.join(d, "bad")
    os.makedirs(bad, exist_ok=True)
    missing = os.path.join(bad, "orphan.qcow2")
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2",
                    missing, SIZE)
    la, lb = os.path.join(bad, "la.qcow2"), os.path.join(bad, "lb.qcow2")
    uqtest.qemu_img("create", "-q", "-f", "qcow2", la, SIZE)
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-b", "la.qcow2", "-F", "qcow2", lb)
    uqtest.qemu_img("rebase", "-u", "-b", "lb.qcow2", "-F", "qcow2", la, input="")
    lone = os.path.join(bad, "lone.qcow2")
    uqtest.qemu_img("create", "-q", "-f", "qcow2", lone, SIZE)
    uqtest.qemu_io("qcow2", lone, ["write -P 7 0 64k"], input="")
    sbase, sover = os.path.join(bad, "sbase.qcow2"), os.path.join(bad, "sover.qcow2")
    uqtest.qemu_img("create", "-q", "-f", "qcow2", sbase, MiB)
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-b", "sbase.qcow2", "-F", "qcow2",
                    sover, SIZE)
    uqtest.qemu_io("qcow2", sover, ["write -P 3 0 2M"], input="")
    small = os.path.join(bad, "c512.qcow2")
    uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", small, SIZE)
    top = os.path.join(chain, TOP)
    out = os.path.join(d, "bad-out.raw")

    cases = []
    for name, img, files, needle in (("missing-backing", missing, [missing], "gone.qcow2"),
                                     ("loop", la, [la, lb], "loop")):
        for cmd in (["io", "-r", img, "-c", "read 0 4k"],
                    ["io", img, "-c", "write 0 4k"],
                    ["io", "--overlay", img, "-c", "write 0 4k"],
                    ["convert", "-O", "raw", img, out],
                    ["map", img],
                    ["info", "--backing-chain", img],
                    ["commit", img],
                    ["rebase", "-b", "", img]):
            label = " ".join(a if not a.startswith("/") else os.path.basename(a) for a in cmd)
            cases.append((f"bad-{name}: {label}",
                          lambda c=cmd, f=files, n=needle: expect_error(c, f, n, c[0])))
    chain_all = chain_files(chain)
    cases += [
        ("bad-rebase-onto-missing (safe)", lambda: expect_error(
            ["rebase", "-b", "nothere.qcow2", "-F", "qcow2", top], chain_all, "nothere.qcow2",
            "rebase")),
        ("bad-rebase-onto-missing (safe, no -F)", lambda: expect_error(
            ["rebase", "-b", "nothere.qcow2", top], chain_all, "nothere.qcow2", "rebase")),
        ("bad-rebase-unsafe-missing-no-fmt", lambda: expect_error(
            ["rebase", "-u", "-b", "nothere.qcow2", top], chain_all, "nothere.qcow2",
            "rebase -u")),
        ("bad-rebase-onto-itself", lambda: expect_error(
            ["rebase", "-b", "top.qcow2", "-F", "qcow2", top], chain_all, TOP, "rebase")),
        ("bad-rebase-onto-its-own-overlay", lambda: expect_error(
            ["rebase", "-b", "../top.qcow2", "-F", "qcow2",
             os.path.join(chain, "mid/l2.qcow2")], chain_all, "l2.qcow2", "rebase")),
        ("bad-rebase-name-beyond-the-header-cluster", lambda: expect_error(
            ["rebase", "-u", "-b", "x" * 600, "-F", "raw", small], [small], "c512.qcow2",
            "rebase -u")),
        ("bad-rebase-name-too-long", lambda: expect_error(
            ["rebase", "-u", "-b", "x" * 1100, "-F", "raw", top], chain_all, TOP, "rebase -u")),
        # qemu-img grows a smaller qcow2 base; we refuse before writing.
        ("bad-commit-into-smaller-qcow2", lambda: expect_error(
            ["commit", sover], [sover, sbase], "sbase.qcow2", "commit")),
        ("bad-commit-no-backing", lambda: expect_error(
            ["commit", lone], [lone], "lone.qcow2", "commit")),
        ("bad-commit-base-not-in-chain", lambda: expect_error(
            ["commit", "-b", lone, top], chain_all + [lone], "lone.qcow2", "commit -b")),
        ("bad-commit-raw-image", lambda: expect_error(
            ["commit", chain_all[0]], chain_all, "base.raw", "commit")),
    ]
    return cases


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    seed = int(os.environ.get("UQ_SEED", "1"))
    print(f"seed={seed} (reproduce with UQ_SEED={seed})", flush=True)
    res = uqtest.Results("test_chain")
    d = uqtest.scratch_dir("chain")
    try:
        chain = os.path.join(d, "chain")
        make_chain(chain, seed)
        pristine = hashes(chain_files(chain))
        res.case("read", case_read, d, chain)
        res.case("create", case_create, d, chain)
        res.case("random-io", case_random_io, d, chain, seed + 1)
        res.case("rebase-unsafe onto l1", rebase_pair, d, chain,
                 ["-u", "-b", "base/l1.qcow2", "-F", "qcow2"], "u-l1")
        res.case("rebase-safe onto l1", rebase_pair, d, chain,
                 ["-b", "base/l1.qcow2", "-F", "qcow2"], "s-l1")
        res.case("rebase-safe onto the raw base", rebase_pair, d, chain,
                 ["-b", "base/base.raw", "-F", "raw"], "s-raw")
        res.case("rebase-safe onto nothing", rebase_pair, d, chain, ["-b", ""], "s-none")
        res.case("rebase-unsafe onto nothing", rebase_pair, d, chain, ["-u", "-b", ""],
                 "u-none")
        res.case("rebase-safe without -F", case_rebase_safe_no_fmt, d, chain)
        res.case("commit into qcow2", commit_pair, d, chain, [], "top")
        res.case("commit -d", commit_pair, d, chain, ["-d"], "keep", TOP, "mid/l2.qcow2",
                 False)
        res.case("commit -b into a deeper qcow2", commit_pair, d, chain,
                 ["-b", "base/l1.qcow2"], "deep", TOP, "base/l1.qcow2", False)
        res.case("commit into a raw base that grows", commit_pair, d, chain, [], "raw",
                 "base/l1.qcow2", "base/base.raw")
        res.case("commit with an internal snapshot", case_commit_snapshot, d, chain)
        res.case("info-chain", case_info_chain, d, chain)
        res.case("overlay", case_overlay, d, chain)
        for name, fn in bad_cases(d, chain):
            res.case(name, fn)
        res.case("the chain itself was never written",
                 lambda: unchanged(pristine, "the original chain"))
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
