#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Dirty and corrupt header bits.

- A dirty image (incompatible bit 0) with wrong refcounts opened read-write
  by `io` is repaired first, as QEMU does: afterwards the bit is clear,
  `qemu-img check` finds nothing, and old and new data read back.
- Opened read-only (`io -r`), the same image is not touched.
- An image with the corrupt bit refuses read-write use with one error line
  and stays unchanged; read-only reads still work.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import uqtest as t  # noqa: E402
from qcow2img import Image  # noqa: E402

DIRTY, CORRUPT = 1, 2


def make(d, name):
    p = os.path.join(d, name)
    t.qemu_create(p, 64 << 20, cluster_size=65536)
    t.qemu_io("qcow2", p, ["write -P 0x5a 0 1M", "write -P 0x6b 8M 128k"])
    return p


def main():
    t.require_tools("qemu-img", "qemu-io")
    d = t.scratch_dir("dirty")
    failures = 0
    try:
        # Dirty with a leaked cluster and a refcount that is too low.
        p = make(d, "dirty.qcow2")
        img = Image(p)
        end = os.path.getsize(p)
        img.set_refcount(end, 1)			# leak: beyond everything
        img.set_refcount(img.h["l1_table_offset"], 0)	# too low: corruption
        img.set_field("incompatible", img.h["incompatible"] | DIRTY)

        before = t.sha256(p)
        t.uq("io", "-r", p, "-c", "read -P 0x5a 0 1M")
        if t.sha256(p) != before:
            print("FAIL: a read-only open changed a dirty image")
            failures += 1

        t.uq("io", p, "-c", "write -P 0x7c 2M 64k")
        if Image(p).h["incompatible"] & DIRTY:
            print("FAIL: dirty bit still set after a read-write open")
            failures += 1
        chk = t.qemu_img("check", p, check=False)
        if chk.returncode != 0:
            print(f"FAIL: qemu-img check after repair exits {chk.returncode}:\n{chk.stdout}")
            failures += 1
        t.qemu_io("qcow2", p, ["read -P 0x5a 0 1M", "read -P 0x6b 8M 128k",
                               "read -P 0x7c 2M 64k"])

        # Corrupt bit: no read-write use, reads still served.
        p = make(d, "corrupt.qcow2")
        img = Image(p)
        img.set_field("incompatible", img.h["incompatible"] | CORRUPT)
        before = t.sha256(p)
        r = t.uq("io", p, "-c", "write -P 1 0 4k", check=False)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        if r.returncode == 0 or len(lines) != 1 or p not in lines[0]:
            print(f"FAIL: write to a corrupt image: exit {r.returncode}, stderr {lines}")
            failures += 1
        if t.sha256(p) != before:
            print("FAIL: refused write changed the corrupt image")
            failures += 1
        t.uq("io", "-r", p, "-c", "read -P 0x5a 0 1M")
    except t.CommandError as e:
        print(f"FAIL: {e}")
        failures += 1
    finally:
        t.cleanup(d)
    print(f"test_dirty: {3 - min(failures, 3)} passed, {min(failures, 3)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
