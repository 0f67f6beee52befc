#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The engine's memory stays within the cache size + 16 MiB whatever the image
size (issue 5): `bench` writes 20000 4k requests 2 MiB apart into fresh
images with 4 KiB clusters (each request allocates an L2 table, so the cache
fills with dirty slices and is flushed for room), then reads them back; the
peak RSS of each run is at most --cache-size + 16 MiB and the image checks
clean. A flush that copied the dirty cache (the old way) fails the 32M case.
Under a sanitizer the RSS is the sanitizer's: the runs and checks go on, the
bound is not asserted."""

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
        p = uqtest.qemu_img("check", img, check=False)
        if p.returncode != 0:
            return f"qemu-img check exits {p.returncode}: {uqtest.tail(p.stdout, 5)}"
        return None
    finally:
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
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
