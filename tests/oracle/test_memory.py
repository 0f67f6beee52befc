#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The engine's memory stays within the cache size + 16 MiB whatever the image
size (issue 5): `bench` writes 20000 4k requests 2 MiB apart into fresh
images with 4 KiB clusters (each request allocates an L2 table, so the cache
fills with dirty slices and is flushed for room), then reads them back; the
peak RSS of each run is at most --cache-size + 16 MiB and the image checks
clean. A flush that copied the dirty cache (the old way) fails the 32M case;
an L1 table held whole (the old way: 16 MiB for 4 TiB) fails the 4 TiB 4M
case. Data written far apart over a 4 TiB disk (several L1 table chunks in
memory, the rest absent) reads back in qemu-io, maps where it was written and
checks clean; committing it from a 4 TiB overlay (whose whole L1 table is
written at once) stays within the default cache + 16 MiB.
Under a sanitizer the RSS is the sanitizer's: the runs and checks go on, the
bound is not asserted."""

import json
import os
import subprocess
import sys

import uqtest

MiB = 1 << 20
TiB = 1 << 40
TIME = "/usr/bin/time"


def peak_rss(d, args):
    """Run @args under GNU time (a child of ours would count our own pages
    from before its exec); (exit status, peak RSS in bytes, stderr)."""
    out = os.path.join(d, "rss")
    p = subprocess.run([TIME, "-f", "%M", "-o", out] + [str(a) for a in args],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with open(out) as f:
        rss = int(f.read().split()[-1]) * 1024
    return p.returncode, rss, p.stderr


def case(d, size, cache):
    img = os.path.join(d, "big.qcow2")
    limit = cache + 16 * MiB
    try:
        uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img,
                        str(size))
        for mode in (["-w"], []):
            args = [uqtest.uq_bin(), "bench", "-q", *mode, "-c", "20000", "-s", "4k",
                    "-S", "2M", "--cache-size", str(cache), img]
            rc, rss, err = peak_rss(d, args)
            what = "write" if mode else "read"
            if rc != 0:
                return f"bench {what} exits {rc}: {err.strip()}"
            note = ", not asserted under a sanitizer" if uqtest.SANITIZED else ""
            print(f"      {what}: peak RSS {rss / MiB:.1f} MiB (bound {limit / MiB:.0f} MiB{note})",
                  flush=True)
            if not uqtest.SANITIZED and rss > limit:
                return f"bench {what}: peak RSS {rss / MiB:.1f} MiB > {limit / MiB:.0f} MiB"
        return uqtest.qemu_check_clean(img, img)
    finally:
        if os.path.exists(img):
            os.unlink(img)


GiB = 1 << 30
# (guest offset, length, pattern): the first and last clusters, both sides of
# L1 chunk boundaries (512 entries, 1 GiB of guest space with 4 KiB clusters),
# and a write straddling one.
SPREAD = [(0, 4096, 0x11), (1 * GiB - 8192, 16384, 0x22),
          (3 * TiB // 2 + 12345 * 4096, 65536, 0x33), (2 * TiB, 4096, 0x44),
          (3 * TiB - 4096, 4096, 0x55), (4 * TiB - 4096, 4096, 0x66)]


def spread(d):
    img = os.path.join(d, "spread.qcow2")
    try:
        uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img,
                        str(4 * TiB))
        # Two opens: the second finds the first one's L1 entries on disk.
        for part in (SPREAD[:3], SPREAD[3:]):
            cmds = []
            for off, n, pat in part:
                cmds += ["-c", f"write -P {pat:#x} {off} {n}"]
            uqtest.uq("io", img, *cmds)
        cmds = []
        for off, n, pat in SPREAD:
            cmds += ["-c", f"read -P {pat:#x} {off} {n}"]
        uqtest.uq("io", "-r", img, *cmds)
        uqtest.qemu_io("qcow2", img, [f"read -P {pat:#x} {off} {n}" for off, n, pat in SPREAD] +
                       ["read -P 0 4096 64k", f"read -P 0 {1 * GiB + 8192} 64k",
                        f"read -P 0 {4 * TiB - 8192} 4096"], extra=["-r"])
        p = uqtest.qemu_img("map", "--output=json", img)
        got = []
        for e in json.loads(p.stdout):
            if not e["data"]:
                continue
            # Guest-adjacent extents apart on the host come as two.
            if got and got[-1][0] + got[-1][1] == e["start"]:
                got[-1] = (got[-1][0], got[-1][1] + e["length"])
            else:
                got.append((e["start"], e["length"]))
        want = sorted((off, n) for off, n, _ in SPREAD)
        if got != want:
            return f"qemu-img map: data at {got}, written {want}"
        return uqtest.qemu_check_clean(img, img)
    finally:
        if os.path.exists(img):
            os.unlink(img)


def commit(d):
    """`commit` empties the overlay: its whole L1 table (16 MiB at 4 TiB) is
    written at once. Held whole it was copied for that write (58 MiB peak);
    absent chunks are now written from the zero buffer."""
    base = os.path.join(d, "cbase.qcow2")
    top = os.path.join(d, "ctop.qcow2")
    limit = 32 * MiB + 16 * MiB     # the default L2 cache (at most 32 MiB) + 16 MiB
    try:
        uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base,
                        str(4 * TiB))
        uqtest.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", base,
                        "-F", "qcow2", top)
        cmds = []
        for off, n, pat in SPREAD:
            cmds += ["-c", f"write -P {pat:#x} {off} {n}"]
        uqtest.uq("io", top, *cmds)
        rc, rss, err = peak_rss(d, [uqtest.uq_bin(), "commit", top])
        if rc != 0:
            return f"commit exits {rc}: {err.strip()}"
        note = ", not asserted under a sanitizer" if uqtest.SANITIZED else ""
        print(f"      commit: peak RSS {rss / MiB:.1f} MiB (bound {limit / MiB:.0f} MiB{note})",
              flush=True)
        if not uqtest.SANITIZED and rss > limit:
            return f"commit: peak RSS {rss / MiB:.1f} MiB > {limit / MiB:.0f} MiB"
        for img in (base, top):
            uqtest.qemu_io("qcow2", img, [f"read -P {pat:#x} {off} {n}"
                                          for off, n, pat in SPREAD], extra=["-r"])
            bad = uqtest.qemu_check_clean(img, img)
            if bad:
                return bad
        p = uqtest.qemu_img("map", "--output=json", top)
        own = [e for e in json.loads(p.stdout) if e["data"] and e["depth"] == 0]
        if own:
            return f"the committed overlay still holds data: {own[:3]}"
        return None
    finally:
        for img in (base, top):
            if os.path.exists(img):
                os.unlink(img)


def main():
    uqtest.require_tools("qemu-img")
    if not os.access(TIME, os.X_OK):
        uqtest.skip(f"{TIME} (GNU time) not found")
    uqtest.uq_bin()
    res = uqtest.Results("test_memory")
    d = uqtest.scratch_dir("memory")
    try:
        res.case("1 TiB, --cache-size 4M", case, d, TiB, 4 * MiB)
        res.case("1 TiB, --cache-size 32M (a cache full of dirty slices)", case, d, TiB,
                 32 * MiB)
        res.case("4 TiB, --cache-size 20M (16 MiB of L1 table)", case, d, 4 * TiB, 20 * MiB)
        res.case("4 TiB, --cache-size 4M (the L1 table held sparse)", case, d, 4 * TiB,
                 4 * MiB)
        res.case("4 TiB, data far apart agrees with qemu-io", spread, d)
        res.case("4 TiB overlay with data far apart committed (its L1 table written whole)",
                 commit, d)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
