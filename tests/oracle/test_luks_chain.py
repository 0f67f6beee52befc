#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""A key per encrypted image of a backing chain, against qemu-img/qemu-io:
qemu-img makes a LUKS base (secret A, serpent) and a LUKS overlay (secret B,
aes) on it, qemu-io fills both; qemu-img reads the chain through a json:
filename that gives each layer its secret.

- `convert -O raw` with both keys (--key-secret, --key-file, --object, in
  either order) reads what qemu-img reads;
- a seeded random write sequence through `io` on the overlay equals qemu-io
  on a raw mirror; qemu-img then reads the chain like the mirror and
  `qemu-img check` is clean;
- `commit` (overlay into base) and `rebase -b ""` (base into overlay) with
  both keys leave what qemu-img reads unchanged, `qemu-img check` clean;
- a wrong or missing key for the base (or no key at all): one error line
  naming the file that would not open, exit 1, neither file changed.
"""

import json
import os
import random
import sys

import uqtest
from test_luks import ITER, MiB, one_line_error, rand_ops

PW_A, PW_B = "base pass A", "overlay pass B"
SIZE = 8 * MiB
OBJS = ["--object", f"secret,id=a,data={PW_A}", "--object", f"secret,id=b,data={PW_B}"]


def chain_json(top, base):
    return "json:" + json.dumps({
        "driver": "qcow2", "file": {"driver": "file", "filename": top},
        "encrypt": {"key-secret": "b"},
        "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": base},
                    "encrypt": {"key-secret": "a"}}})


def qemu_luks(path, sid, enc, *extra):
    o = f"encrypt.format=luks,encrypt.key-secret={sid},{ITER},{enc}"
    uqtest.qemu_img_luks("create", "-q", *OBJS, "-f", "qcow2", "-o", o, *extra, path, str(SIZE))


def qemu_io_json(spec, cmds):
    args = ["qemu-io", *OBJS]
    for c in cmds:
        args += ["-c", c]
    p = uqtest.run(args + [spec])
    bad = [l for l in (p.stdout + p.stderr).splitlines() if "failed" in l or "error" in l.lower()]
    if bad:
        raise uqtest.CommandError(f"qemu-io reported: {bad[0]}")


def fill(base, top):
    # The base alone (its own secret), then the overlay over part of it.
    uqtest.run(["qemu-io", *OBJS, "--image-opts", "-c", "write -P 0x41 0 3M",
                "-c", "write -P 0x42 5M 1M",
                f"driver=qcow2,file.filename={base},encrypt.key-secret=a"])
    qemu_io_json(chain_json(top, base), ["write -P 0x51 1M 64k", "write -P 0x52 2M 1536k",
                                         "write -z 5M 4k"])


def qemu_chain_raw(top, base, out):
    uqtest.qemu_img("convert", *OBJS, "-O", "raw", chain_json(top, base), out)


def case_read(d, base, top):
    ref, ours = os.path.join(d, "ref.raw"), os.path.join(d, "ours.raw")
    qemu_chain_raw(top, base, ref)
    ka, kb = os.path.join(d, "key-a"), os.path.join(d, "key-b")
    for path, pw in ((ka, PW_A), (kb, PW_B)):
        with open(path, "w") as f:
            f.write(pw)
    before = (uqtest.sha256(base), uqtest.sha256(top))
    for keys in (["--key-secret", PW_B, "--key-secret", PW_A],
                 ["--key-secret", PW_A, "--key-secret", PW_B],
                 ["--key-file", kb, "--key-file", ka],
                 ["--key-secret", PW_A, "--key-file", kb],
                 OBJS):
        uqtest.uq("convert", *keys, "-O", "raw", top, ours)
        diff = uqtest.first_difference(ref, ours)
        if diff:
            return f"convert {keys}: differs from qemu-img's chain: {diff}"
    if (uqtest.sha256(base), uqtest.sha256(top)) != before:
        return "reading changed an image"
    p = uqtest.uq("map", "--output=json", "--key-secret", PW_B, "--key-secret", PW_A, top,
                  check=False)
    if p.returncode != 0:
        return f"map with both keys exited {p.returncode}: {p.stderr.strip()}"
    return None


def case_write(d, base, top, seed):
    mirror = os.path.join(d, "mirror.raw")
    qemu_chain_raw(top, base, mirror)
    base_before = uqtest.sha256(base)
    rng = random.Random(seed)
    for b in range(2):
        ops = rand_ops(rng, 150, SIZE)
        cmdfile = os.path.join(d, f"ops{b}")
        with open(cmdfile, "w") as f:
            f.write("".join(o + "\n" for o, _ in ops))
        p = uqtest.uq("io", "--key-secret", PW_A, "--key-secret", PW_B, top, "-C", cmdfile,
                      check=False)
        if p.returncode != 0:
            return f"batch {b}: io exited {p.returncode}\n{uqtest.tail(p.stderr, 5)}"
        mc = [m for _, m in ops if m]
        for i in range(0, len(mc), 300):
            uqtest.qemu_io("raw", mirror, mc[i:i + 300])
    if uqtest.sha256(base) != base_before:
        return "writes to the overlay changed the base"
    p = uqtest.qemu_img("compare", *OBJS, chain_json(top, base), mirror, check=False)
    if p.returncode != 0:
        return f"qemu-img compare of the chain with the mirror: {(p.stdout + p.stderr).strip()}"
    p = uqtest.qemu_img("check", *OBJS, "--output=json", chain_json(top, base), check=False)
    r = json.loads(p.stdout or "{}")
    if p.returncode != 0 or any(r.get(k, 0) for k in ("corruptions", "leaks", "check-errors")):
        return f"qemu-img check: exit {p.returncode}: {p.stdout} {p.stderr}"
    return None


def case_bad_keys(d, base, top):
    before = (uqtest.sha256(base), uqtest.sha256(top))
    out = os.path.join(d, "x.raw")
    for args, words, path in [
            (["io", "--key-secret", PW_B, "--key-secret", "wrong", top, "-c", "write -P 1 0 4k"],
             ["base.qcow2", "invalid password", "any of the 2"], top),
            (["io", "--key-secret", PW_B, top, "-c", "write -P 1 0 4k"],
             ["base.qcow2", "invalid password"], top),
            (["convert", "--key-secret", PW_B, "-O", "raw", top, out],
             ["base.qcow2", "invalid password"], top),
            (["io", "--key-secret", PW_A, top, "-c", "write -P 1 0 4k"],
             ["invalid password"], top),
            (["io", top, "-c", "write -P 1 0 4k"], ["encrypted", "key"], top)]:
        p = uqtest.uq(*args, check=False)
        err = one_line_error(p, words, path)
        if err:
            return f"{args}: {err}"
        if (uqtest.sha256(base), uqtest.sha256(top)) != before:
            return f"{args} changed an image"
    if os.path.exists(out) and os.path.getsize(out):
        return "a failed convert wrote its target"
    return None


def qemu_one_raw(path, sid, out):
    uqtest.qemu_img("convert", *OBJS, "--image-opts",
                    f"driver=qcow2,file.filename={path},encrypt.key-secret={sid}",
                    "-O", "raw", out)


def qemu_one_check(path, sid):
    p = uqtest.qemu_img("check", *OBJS, "--output=json", "--image-opts",
                        f"driver=qcow2,file.filename={path},encrypt.key-secret={sid}",
                        check=False)
    r = json.loads(p.stdout or "{}")
    if p.returncode != 0 or any(r.get(k, 0) for k in ("corruptions", "leaks", "check-errors")):
        return f"qemu-img check {path}: exit {p.returncode}: {p.stdout} {p.stderr}"
    return None


def copy_chain(d, base, top, name):
    sub = os.path.join(d, name)
    os.mkdir(sub)
    for src in (base, top):
        with open(src, "rb") as a, open(os.path.join(sub, os.path.basename(src)), "wb") as b:
            b.write(a.read())
    return os.path.join(sub, "base.qcow2"), os.path.join(sub, "top.qcow2")


def case_commit_rebase(d, base, top):
    ref, got = os.path.join(d, "cr.ref.raw"), os.path.join(d, "cr.got.raw")
    qemu_chain_raw(top, base, ref)
    # commit: the overlay's data into the base, each with its own key.
    cb, ct = copy_chain(d, base, top, "commit")
    before = (uqtest.sha256(cb), uqtest.sha256(ct))
    err = one_line_error(uqtest.uq("commit", "--key-secret", PW_B, ct, check=False),
                         ["base.qcow2", "invalid password"], ct)
    if err:
        return f"commit with the overlay's key only: {err}"
    if (uqtest.sha256(cb), uqtest.sha256(ct)) != before:
        return "a refused commit changed an image"
    uqtest.uq("commit", "--key-secret", PW_B, "--key-secret", PW_A, ct)
    qemu_one_raw(cb, "a", got)
    diff = uqtest.first_difference(ref, got)
    if diff:
        return f"after commit the base (read by qemu-img) differs from the chain: {diff}"
    err = qemu_one_check(cb, "a")
    if err:
        return f"after commit: {err}"
    # rebase -b "": the base's data into the overlay, which then stands alone.
    rb, rt = copy_chain(d, base, top, "rebase")
    uqtest.uq("rebase", "--key-file", "/dev/stdin", "--key-secret", PW_A, "-b", "", rt,
              input=PW_B)
    qemu_one_raw(rt, "b", got)
    diff = uqtest.first_difference(ref, got)
    if diff:
        return f"after rebase -b '' the overlay (read by qemu-img) differs: {diff}"
    return qemu_one_check(rt, "b")


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    seed = uqtest.base_seed()
    res = uqtest.Results("test_luks_chain")
    d = uqtest.scratch_dir("luks-chain")
    try:
        base, top = os.path.join(d, "base.qcow2"), os.path.join(d, "top.qcow2")
        qemu_luks(base, "a", "encrypt.cipher-alg=serpent-256,cluster_size=4096")
        qemu_luks(top, "b", "cluster_size=65536", "-u", "-b", "base.qcow2", "-F", "qcow2")
        fill(base, top)
        res.case("two keys: the chain reads like qemu-img's", case_read, d, base, top)
        res.case("wrong or missing base key: one error line, nothing written", case_bad_keys,
                 d, base, top)
        res.case(f"two keys: random io on the overlay (seed {seed})", case_write, d, base, top,
                 seed)
        res.case("two keys: commit and rebase -b '' agree with qemu-img", case_commit_rebase,
                 d, base, top)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
