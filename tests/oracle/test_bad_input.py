#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Bad images (tests/images/qcow2img.py breaks a valid qemu-img image one
way each) fed to info, check, convert -O raw, io read (read-write and -r)
and io write, each told `-f qcow2`: each command must fail with exactly one
line on stderr that names the file, exit nonzero, leave the file byte for
byte as it was (sha256 before and after), finish within a minute, and stay
within 1 GiB of address space (RLIMIT_AS; under ASan, whose shadow memory
rules RLIMIT_AS out, the allocator's max_allocation_size_mb /
hard_rss_limit_mb instead).

Where qemu-img behaves otherwise we mirror it or say why not:
  l2-misaligned,       `check` reports it as corruption (exit 2), like
  l2-beyond-eof,       qemu-img check; `info` needs no L2 table, and qemu-img
  compressed-out-of-   info succeeds, so success or a one-line error are both
  range                accepted.  A read-write open that meets the bad L1
                       or L2 entry marks the image corrupt, as qemu-io does (and
                       STYLE.md asks): the corrupt bit (incompatible bit 1)
                       may be set in the header, and nothing else may change.
                       `io -r` must leave the file untouched. (qemu reads
                       zeros from an L2 table past the end of the file; a
                       write there would stretch the file to wherever the
                       image points, so we refuse it as corrupt.)
  l1-beyond-eof,       qemu opens these (a read past EOF gives zeros) and
  reftable-beyond-eof  only `qemu-img check` objects (exit 2); we require an
                       error from every command, and accept either a
                       one-line open error (exit 1) or reported corruption
                       (exit 2) from `check`.
  bad-magic            with `-f qcow2` an error like any other; without -f
                       the file is probed as raw, as qemu-img does: `info`
                       says raw and `check` exits 63 (no checks for raw).
The valid source image is run through the same commands first: all must
succeed on it, or every "error" below would prove nothing.
"""

import json
import os
import re
import shutil
import sys

import uqtest
import qcow2img

MEM_LIMIT = 1 << 30
TIMEOUT = 60

COMMANDS = {
    "info": lambda img, d: ["info", "-f", "qcow2", img],
    "check": lambda img, d: ["check", "-f", "qcow2", img],
    "convert": lambda img, d: ["convert", "-f", "qcow2", "-O", "raw", img,
                               os.path.join(d, "out.raw")],
    "io-read": lambda img, d: ["io", "-f", "qcow2", img, "-c", "read 0 64k"],
    "io-read-ro": lambda img, d: ["io", "-r", "-f", "qcow2", img, "-c", "read 0 64k"],
    "io-write": lambda img, d: ["io", "-f", "qcow2", img, "-c", "write 0 4k"],
}
READ_WRITE = ("io-read", "io-write")
CORRUPT_BIT = 1 << 1

# (case, command) -> what is accepted instead of the default "error";
# alternatives joined by "|":
#   error     nonzero exit (1 for check) and exactly one stderr line naming the file
#   ok        exit 0
#   corrupt   exit 2: check reports corruption
EXCEPTIONS = {
    ("l2-misaligned", "info"): "ok|error",
    ("l2-misaligned", "check"): "corrupt",
    ("l1-beyond-eof", "check"): "corrupt|error",
    ("reftable-beyond-eof", "check"): "corrupt|error",
    ("compressed-out-of-range", "info"): "ok|error",
    ("compressed-out-of-range", "check"): "corrupt",
    ("l2-beyond-eof", "info"): "ok|error",
    ("l2-beyond-eof", "check"): "corrupt",
}
# Cases whose read-write opens find the corruption while reading and may
# mark the image corrupt (the header's corrupt bit, nothing else).
MARKS_CORRUPT = ("l2-misaligned", "compressed-out-of-range", "l2-beyond-eof")


def one_error_line(p, img, case, cmd):
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    if len(lines) != 1:
        return (f"expected exactly one line on stderr, got {len(lines)}:\n"
                + uqtest.tail(p.stderr, 8))
    line = lines[0]
    if img not in line and os.path.basename(img) not in line:
        return f"the error line does not name the file: {line!r}"
    if case == "unknown-feature-named" and qcow2img.UNKNOWN_NAME not in line:
        return f"the error line does not name the feature {qcow2img.UNKNOWN_NAME!r}: {line!r}"
    if case == "unknown-feature" and not re.search(
            rf"\b{qcow2img.UNKNOWN_BIT}\b|{1 << qcow2img.UNKNOWN_BIT:x}", line):
        return f"the error line does not name feature bit {qcow2img.UNKNOWN_BIT}: {line!r}"
    return None


def judge(p, img, case, cmd, accept):
    """None if the outcome of @p is acceptable for (@case, @cmd)."""
    rc = p.returncode
    if rc < 0 or rc >= 128 or "Sanitizer" in p.stderr or "runtime error" in p.stderr:
        return f"crashed (exit {rc}):\n{uqtest.tail(p.stderr, 12)}"
    errs = []
    for a in accept.split("|"):
        if a == "ok":
            if rc == 0:
                return None
            err = None
        elif a == "corrupt":
            if rc == 2:
                return None
            err = f"expected exit 2 (corruption reported), got {rc}"
        else:
            if rc == 0:
                err = "exit 0: expected an error"
            elif cmd == "check" and rc != 1:
                err = f"check: exit {rc}; an image that cannot be opened is exit 1"
            else:
                err = one_error_line(p, img, case, cmd)
            if not err:
                return None
        if err:
            errs.append(err)
    return "; or ".join(errs) + f"\n(stderr: {uqtest.tail(p.stderr, 4).strip()!r})"


def only_corrupt_bit_set(before, img):
    """True if @img differs from the bytes @before only in the header's
    incompatible features, which gained the corrupt bit."""
    with open(img, "rb") as f:
        after = f.read()
    if len(after) != len(before) or after[:72] != before[:72] or after[80:] != before[80:]:
        return False
    old = int.from_bytes(before[72:80], "big")
    return int.from_bytes(after[72:80], "big") == old | CORRUPT_BIT


def one_case(d, img, case, cmd):
    args = COMMANDS[cmd](img, d)
    with open(img, "rb") as f:
        before_bytes = f.read()
    before = uqtest.sha256(img)
    p = uqtest.uq(*args, check=False, mem_limit=MEM_LIMIT, timeout=TIMEOUT)
    out = os.path.join(d, "out.raw")
    if os.path.exists(out):
        os.unlink(out)
    if case == "valid":
        if p.returncode != 0:
            return (f"fails on the valid image (exit {p.returncode}):\n"
                    + uqtest.tail(p.stderr, 6))
        return None
    err = judge(p, img, case, cmd, EXCEPTIONS.get((case, cmd), "error"))
    if uqtest.sha256(img) != before:
        if not (case in MARKS_CORRUPT and cmd in READ_WRITE and
                only_corrupt_bit_set(before_bytes, img)):
            err = (err + "\n" if err else "") + "the image file changed"
    return err


def probe_bad_magic(d, src):
    """Without -f a file without the qcow2 magic is raw, as for qemu-img."""
    img = os.path.join(d, "probe.img")
    qcow2img.make_bad("bad-magic", src, img)
    p = uqtest.uq("info", "--output=json", img, check=False, mem_limit=MEM_LIMIT,
                  timeout=TIMEOUT)
    q = uqtest.qemu_img("info", "--output=json", img)
    ours = json.loads(p.stdout).get("format") if p.returncode == 0 else None
    theirs = json.loads(q.stdout).get("format")
    if ours != theirs:
        return f"info probes the format as {ours!r} (exit {p.returncode}), qemu-img as {theirs!r}"
    p = uqtest.uq("check", img, check=False, mem_limit=MEM_LIMIT, timeout=TIMEOUT)
    q = uqtest.qemu_img("check", img, check=False)
    if p.returncode != q.returncode:
        return f"check exits {p.returncode}, qemu-img check exits {q.returncode}"
    return None


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    res = uqtest.Results("test_bad_input")
    d = uqtest.scratch_dir("bad")
    try:
        src = os.path.join(d, "source.qcow2")
        qcow2img.make_source(src)
        cases = ["valid"] + list(qcow2img.BAD_IMAGES)
        for case in cases:
            img = os.path.join(d, f"{case}.qcow2")
            what = "the valid source" if case == "valid" else qcow2img.BAD_IMAGES[case][1]
            print(f"# {case}: {what}", flush=True)
            for cmd in COMMANDS:
                if case != "valid":
                    qcow2img.make_bad(case, src, img)
                else:
                    shutil.copyfile(src, img)
                res.case(f"{case}: {cmd}", one_case, d, img, case, cmd)
        res.case("bad-magic, format probed: info and check as qemu-img", probe_bad_magic, d, src)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
