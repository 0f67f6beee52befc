#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""LUKS serpent and twofish (nettle) against qemu-img/qemu-io, for the
cipher x mode x IV generator x key size combinations qemu-img 7.2 makes
(192-bit keys only in xts: elsewhere its key material ends inside a sector
and QEMU asserts):

- images qemu-img creates and qemu-io fills read like qemu-img reads them
  (`convert -O raw`), `info` shows qemu-img's encryption details, then a
  seeded random write sequence through `ublk-qcow2 io` equals qemu-io on a
  raw mirror, `qemu-img check` clean after each batch;
- images we create (`create`, and `convert -o`) open in qemu-io with the same
  secret and the right data, and take the same random writes;
- 192-bit keys outside xts are refused at create with one error line,
  nothing written.
"""

import os
import random
import sys

import uqtest
from test_luks import (ITER, MiB, PW, case_ours, case_qemu_made, one_line_error, qemu_check_clean,
                       qemu_raw, random_io, secret)

# (mode-ivgen, key bits, cluster size): all for both ciphers. xts-plain64 and
# cbc-essiv:sha256 at every key size QEMU takes, each other mode/IV once.
COMBOS = [
    ("xts", "plain64", 128, 65536), ("xts", "plain64", 192, 4096), ("xts", "plain64", 256, 65536),
    ("cbc", "essiv", 128, 4096), ("cbc", "essiv", 256, 65536),
    ("xts", "essiv", 192, 65536), ("xts", "plain", 256, 4096),
    ("cbc", "plain64", 256, 4096), ("cbc", "plain", 128, 65536),
    ("ecb", "plain64", 128, 4096),
    ("ctr", "plain64", 256, 65536), ("ctr", "essiv", 128, 4096),
]
CIPHERS = ("serpent", "twofish")


def enc_opts(cipher, mode, ivgen, bits):
    o = (f"encrypt.cipher-alg={cipher}-{bits},encrypt.cipher-mode={mode},"
         f"encrypt.ivgen-alg={ivgen}")
    if ivgen == "essiv":
        o += ",encrypt.ivgen-hash-alg=sha256"
    return o


def case_qemu_made_io(d, idx, enc, cluster, seed):
    err = case_qemu_made(d, idx, enc, cluster, "1.1")
    if err:
        return err
    return random_io(d, os.path.join(d, f"q{idx}.qcow2"), 8 * MiB, seed)


def case_convert_to(d, idx, enc):
    src = os.path.join(d, f"cv{idx}.raw")
    dst = os.path.join(d, f"cv{idx}.qcow2")
    rng = random.Random(idx)
    with open(src, "wb") as f:
        for i in range(24):
            f.write(bytes([rng.randint(1, 255)]) * 65536 if i % 3 else bytes(65536))
    uqtest.uq("convert", *secret("k"), "-O", "qcow2",
              "-o", f"encrypt.format=luks,encrypt.key-secret=k,{ITER},{enc}", src, dst)
    err = qemu_check_clean(dst, "after convert")
    if err:
        return err
    ref = os.path.join(d, f"cv{idx}.ref.raw")
    qemu_raw(dst, ref)
    diff = uqtest.first_difference(src, ref)
    if diff:
        return f"qemu-img reads the converted image differently from its source: {diff}"
    return None


def case_192_refused(d):
    for cipher in CIPHERS:
        for mode in ("cbc", "ecb", "ctr"):
            img = os.path.join(d, f"r192-{cipher}-{mode}.qcow2")
            p = uqtest.uq("create", *secret("k"), "-o",
                          f"encrypt.format=luks,encrypt.key-secret=k,{ITER},"
                          f"encrypt.cipher-alg={cipher}-192,encrypt.cipher-mode={mode}",
                          img, "1M", check=False)
            err = one_line_error(p, [f"{cipher}-192", "QEMU cannot open"], img)
            if err:
                return f"{cipher}-192 {mode}: {err}"
            if os.path.exists(img):
                return f"{cipher}-192 {mode}: the refused create left {img}"
    return None


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    base = uqtest.base_seed()
    res = uqtest.Results("test_luks_ciphers")
    d = uqtest.scratch_dir("luks-ciphers")
    try:
        idx = 0
        for ci, cipher in enumerate(CIPHERS):
            # Under ASan (three times slower) each cipher takes half the
            # combinations, the two halves together all of them.
            for mode, ivgen, bits, cluster in COMBOS[ci::2] if uqtest.SANITIZED else COMBOS:
                enc = enc_opts(cipher, mode, ivgen, bits)
                name = f"{cipher}-{bits} {mode}-{ivgen} c{cluster // 1024}k"
                seed = base * 1000 + idx
                # A directory per combination, removed after it: tmpfs is memory.
                sub = os.path.join(d, f"c{idx}")
                os.mkdir(sub)
                res.case(f"qemu-made {name}: read like qemu-img, random io (seed {seed})",
                         case_qemu_made_io, sub, idx, enc, cluster, seed)
                res.case(f"ours {name}: qemu reads it, random io (seed {seed + 500})",
                         case_ours, sub, idx, enc, cluster, seed + 500)
                if mode in ("xts", "cbc") and ivgen in ("plain64", "essiv"):
                    res.case(f"convert -o {name}: qemu-img reads it", case_convert_to, sub,
                             idx, enc)
                uqtest.cleanup(sub)
                idx += 1
        res.case("192-bit keys outside xts refused at create", case_192_refused, d)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
