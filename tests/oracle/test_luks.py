#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Encrypted qcow2 images against qemu-img/qemu-io, with the same secret:

- LUKS images qemu-img creates (several AES modes, CAST5, 4k and 64k clusters,
  v2 and v3), filled by qemu-io, read by us byte for byte like qemu-img
  (`convert -O raw`), and `info` shows the same encryption details;
- seeded random writes (some not sector aligned) through `ublk-qcow2 io`
  on such images and on images we create, compared with a raw mirror, then
  read back by qemu-img (compare) and `qemu-img check` clean;
- images we create (several modes, also preallocated) and `convert -o
  encrypt.format=luks` open in qemu-io with the right data;
- a wrong or missing key: one clear error line, exit 1, image untouched;
- legacy AES (crypt_method 1) images read like qemu-img reads them, and
  refused read-write with a clear message;
- damaged LUKS headers (unknown cipher, key material out of bounds): clear
  errors, no crash.
"""

import json
import os
import random
import sys

import uqtest

KiB, MiB = 1 << 10, 1 << 20
PW = "s3cret pass"
ITER = "encrypt.iter-time=10"		# keep PBKDF2 fast: ~10 ms per key

# (name, qemu-img -o encrypt.* options, cluster size, compat)
QEMU_CONFIGS = [
    ("xts-plain64 aes-256 c64k", "", 65536, "1.1"),
    ("xts-plain64 aes-128 c4k", "encrypt.cipher-alg=aes-128", 4096, "1.1"),
    ("cbc-essiv:sha256 aes-256 c64k", "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
     65536, "1.1"),
    ("cbc-essiv:sha256 aes-128 c4k",
     "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv", 4096, "1.1"),
    ("cbc-plain64 aes-256 c4k", "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64",
     4096, "1.1"),
    ("cbc-plain aes-128 c64k v2",
     "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain", 65536, "0.10"),
    # CAST5 (8-byte blocks) through OpenSSL's legacy provider.
    ("cbc-plain64 cast5-128 c64k",
     "encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64", 65536,
     "1.1"),
    ("cbc-essiv:md5 cast5-128 c4k",
     "encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
     "encrypt.ivgen-hash-alg=md5", 4096, "1.1"),
]

# (name, our -o encrypt.* options, cluster size)
OUR_CONFIGS = [
    ("ours xts-plain64 default c64k", "", 65536),
    ("ours cbc-essiv aes-128 c4k",
     "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv", 4096),
    ("ours cbc-plain64 aes-256 c512", "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64", 512),
    ("ours cbc-essiv:md5 cast5-128 c64k",
     "encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
     "encrypt.ivgen-hash-alg=md5", 65536),
]


def secret(sid="sec0", pw=PW):
    return ["--object", f"secret,id={sid},data={pw}"]


def opts_qcow2(path, sid="sec0"):
    return f"driver=qcow2,file.filename={path},encrypt.key-secret={sid}"


def qemu_create_luks(path, size, enc, cluster, compat="1.1"):
    o = f"encrypt.format=luks,encrypt.key-secret=sec0,{ITER},cluster_size={cluster},compat={compat}"
    if enc:
        o += "," + enc
    uqtest.qemu_img_luks("create", "-q", *secret(), "-f", "qcow2", "-o", o, path, str(size))


def qemu_io_enc(path, cmds, pw=PW):
    args = ["qemu-io"] + secret(pw=pw) + ["--image-opts"]
    for c in cmds:
        args += ["-c", c]
    args.append(opts_qcow2(path))
    p = uqtest.run(args)
    bad = [l for l in (p.stdout + p.stderr).splitlines()
           if "failed" in l or "error" in l.lower() or "verification" in l]
    if bad:
        raise uqtest.CommandError(f"qemu-io reported: {bad[0]}")
    return p


def qemu_raw(path, out, pw=PW):
    uqtest.qemu_img("convert", *secret(pw=pw), "--image-opts", opts_qcow2(path), "-O", "raw", out)


def qemu_check_clean(path, when, pw=PW):
    return uqtest.qemu_check_clean(when, *secret(pw=pw), "--image-opts", opts_qcow2(path))


def qemu_info_encrypt(path):
    p = uqtest.qemu_img("info", "--output=json", path)
    return json.loads(p.stdout)["format-specific"]["data"]["encrypt"]


def our_info(path):
    return json.loads(uqtest.uq("info", "--output=json", path).stdout)


def fill_cmds(size, cluster):
    """qemu-io commands: patterns at cluster edges, partial clusters, zeroes."""
    c = cluster
    return [f"write -P 0x5a 0 {3 * c}",
            f"write -P 0x11 {c + 512} 1024",
            f"write -P 0x22 {5 * c - 512} {2 * c + 1024}",
            f"write -P 0x33 {size // 2 + 4096} 4608",
            f"write -z {c} 512",
            f"write -P 0x44 {size - 1024} 1024"]


def case_qemu_made(d, idx, enc, cluster, compat):
    size = 8 * MiB
    img = os.path.join(d, f"q{idx}.qcow2")
    qemu_create_luks(img, size, enc, cluster, compat)
    qemu_io_enc(img, fill_cmds(size, cluster))
    ref, ours = os.path.join(d, f"q{idx}.ref.raw"), os.path.join(d, f"q{idx}.our.raw")
    qemu_raw(img, ref)
    before = uqtest.sha256(img)
    uqtest.uq("convert", "--key-secret", PW, "-O", "raw", img, ours)
    diff = uqtest.first_difference(ref, ours)
    if diff:
        return f"convert -O raw differs from qemu-img's: {diff}"
    if uqtest.sha256(img) != before:
        return "reading changed the image"
    # The same, with qemu-img's spelling of the secret.
    uqtest.uq("convert", *secret(), "-O", "raw", img, ours)
    diff = uqtest.first_difference(ref, ours)
    if diff:
        return f"convert --object ... -O raw differs from qemu-img's: {diff}"
    info = our_info(img)
    if info.get("encrypted") is not True:
        return f"info --output=json has no \"encrypted\": true: {info}"
    theirs = qemu_info_encrypt(img)
    mine = info["format-specific"]["data"].get("encrypt")
    if mine != theirs:
        return f"info encrypt differs:\n ours   {mine}\n qemu's {theirs}"
    human = uqtest.uq("info", img).stdout
    if "encrypted: yes" not in human or "format: luks" not in human:
        return f"human info lacks 'encrypted: yes'/'format: luks':\n{human}"
    p = uqtest.uq("check", *secret(), img, check=False)
    if p.returncode != 0:
        return f"ublk-qcow2 check exited {p.returncode}: {p.stdout} {p.stderr}"
    return None


def rand_ops(rng, n, size):
    """[(ours, mirror)] pairs; ~10% of the writes are not sector aligned."""
    ops = []
    for _ in range(n):
        r = rng.random()
        if r < 0.1:
            length = rng.randint(1, 3000)
            off = rng.randint(0, size - length)
        else:
            length = rng.choice([1, 1, 2, 8, 16, 130, 300]) * 512
            off = rng.randint(0, (size - length) // 512) * 512
            if rng.random() < 0.5:
                off = rng.randint(0, (2 * MiB - length) // 512) * 512
        if r < 0.75:
            cmd = f"write -P {rng.randint(1, 255):#x} {off} {length}"
        elif r < 0.9:
            cmd = f"write -z {off} {length}"
        else:
            ops.append(("flush", None))
            continue
        ops.append((cmd, cmd))
    return ops


def random_io(d, img, size, seed, pw=PW):
    mirror = os.path.join(d, os.path.basename(img) + ".mirror")
    ours = os.path.join(d, os.path.basename(img) + ".our.raw")
    rng = random.Random(seed)
    # The mirror starts as the image reads now (qemu-img's view).
    qemu_raw(img, mirror, pw)
    for b in range(2):
        ops = rand_ops(rng, 150, size)
        cmdfile = os.path.join(d, f"{os.path.basename(img)}.ops{b}")
        with open(cmdfile, "w") as f:
            f.write("".join(o + "\n" for o, _ in ops))
        p = uqtest.uq("io", "--key-secret", pw, img, "-C", cmdfile, check=False)
        if p.returncode != 0:
            return f"batch {b}: io exited {p.returncode}\n{uqtest.tail(p.stderr, 5)}"
        mc = [m for _, m in ops if m]
        for i in range(0, len(mc), 300):
            uqtest.qemu_io("raw", mirror, mc[i:i + 300])
        err = qemu_check_clean(img, f"after batch {b}", pw)
        if err:
            return err
    p = uqtest.qemu_img("compare", *secret(pw=pw), "--image-opts", opts_qcow2(img),
                        f"driver=raw,file.filename={mirror}", check=False)
    if p.returncode != 0:
        return f"qemu-img compare with the raw mirror: {(p.stdout + p.stderr).strip()}"
    uqtest.uq("convert", "--key-secret", pw, "-O", "raw", img, ours)
    diff = uqtest.first_difference(mirror, ours)
    if diff:
        return f"our convert -O raw differs from the mirror: {diff}"
    p = uqtest.uq("check", "--key-secret", pw, img, check=False)
    if p.returncode != 0:
        return f"ublk-qcow2 check exited {p.returncode}: {p.stdout} {p.stderr}"
    return None


def case_qemu_random(d, idx, enc, cluster, compat, seed):
    size = 8 * MiB
    img = os.path.join(d, f"r{idx}.qcow2")
    qemu_create_luks(img, size, enc, cluster, compat)
    qemu_io_enc(img, fill_cmds(size, cluster))
    return random_io(d, img, size, seed)


def case_ours(d, idx, enc, cluster, seed):
    size = 4 * MiB
    img = os.path.join(d, f"o{idx}.qcow2")
    o = f"encrypt.format=luks,encrypt.key-secret=k,{ITER},cluster_size={cluster}"
    if enc:
        o += "," + enc
    uqtest.uq("create", "--object", f"secret,id=k,data={PW}", "-o", o, img, str(size))
    err = qemu_check_clean(img, "after create")
    if err:
        return err
    # qemu-io reads what we wrote, and sees zeros where nothing was.
    uqtest.uq("io", "--key-secret", PW, img, "-c", f"write -P 0x6b {cluster // 2} {3 * cluster}",
              "-c", "write -P 0x6c 1000000 777")
    qemu_io_enc(img, [f"read -P 0 0 {cluster // 2}",
                      f"read -P 0x6b {cluster // 2} {3 * cluster}",
                      f"read -P 0 {cluster // 2 + 3 * cluster} {cluster}",
                      "read -P 0x6c 1000000 777", "read -P 0 1000777 100"])
    theirs = qemu_info_encrypt(img)
    mine = our_info(img)["format-specific"]["data"]["encrypt"]
    if mine != theirs:
        return f"info encrypt differs:\n ours   {mine}\n qemu's {theirs}"
    return random_io(d, img, size, seed)


def case_prealloc(d, mode, cluster, seed):
    """create -o encrypt.format=luks,preallocation=MODE as qemu-img makes it:
    same file size and map, and the preallocated clusters (host zeros) read
    as the same noise in qemu-img and through us, on its image and ours."""
    size = 4 * MiB
    ours, ref = os.path.join(d, f"pa-{mode}.qcow2"), os.path.join(d, f"pa-{mode}-ref.qcow2")
    o = f"encrypt.format=luks,encrypt.key-secret=sec0,{ITER},cluster_size={cluster}"
    uqtest.uq("create", *secret(), "-o", f"{o},preallocation={mode}", ours, str(size))
    qemu_create_luks(ref, size, f"preallocation={mode}", cluster)
    err = qemu_check_clean(ours, "after create")
    if err:
        return err
    if os.path.getsize(ours) != os.path.getsize(ref):
        return f"file {os.path.getsize(ours)} bytes, qemu-img's {os.path.getsize(ref)}"
    maps = [uqtest.qemu_img("map", "--output=json", *secret(), "--image-opts",
                            opts_qcow2(x)).stdout for x in (ours, ref)]
    if maps[0] != maps[1]:
        return f"qemu-img map differs:\n{maps[0]}\n{maps[1]}"
    if qemu_info_encrypt(ours).keys() != qemu_info_encrypt(ref).keys():
        return "info encrypt differs"
    for x in (ours, ref):
        a, b = x + ".qemu.raw", x + ".our.raw"
        qemu_raw(x, a)
        uqtest.uq("convert", "--key-secret", PW, "-O", "raw", x, b)
        diff = uqtest.first_difference(a, b)
        if diff:
            return f"{os.path.basename(x)}: our read differs from qemu-img's: {diff}"
    return random_io(d, ours, size, seed)


def case_convert_encrypt(d):
    src = os.path.join(d, "plain.raw")
    dst = os.path.join(d, "conv.qcow2")
    with open(src, "wb") as f:
        rng = random.Random(7)
        for i in range(40):
            f.write(bytes([rng.randint(0, 255)]) * 65536 if i % 3 else bytes(65536))
        f.write(b"tail" * 100)			# not a whole sector
    uqtest.uq("convert", *secret("k"), "-O", "qcow2",
              "-o", f"encrypt.format=luks,encrypt.key-secret=k,{ITER},cluster_size=4096",
              src, dst)
    err = qemu_check_clean(dst, "after convert")
    if err:
        return err
    ref = os.path.join(d, "conv.ref.raw")
    qemu_raw(dst, ref)
    with open(src, "rb") as a, open(ref, "rb") as b:
        x, y = a.read(), b.read()
    if y[:len(x)] != x or y[len(x):].strip(b"\0"):
        return "qemu-img reads the converted image differently from its source"
    return None


def one_line_error(p, words, path):
    lines = p.stderr.strip().splitlines()
    if p.returncode != 1 or len(lines) != 1:
        return f"want exit 1 and one error line, got exit {p.returncode}: {p.stderr!r}"
    if path not in lines[0] or not all(w in lines[0] for w in words):
        return f"error line lacks {words} or the file name: {lines[0]}"
    return None


def case_wrong_key(d):
    img = os.path.join(d, "wk.qcow2")
    qemu_create_luks(img, 4 * MiB, "", 65536)
    qemu_io_enc(img, ["write -P 0x42 0 128k"])
    before = uqtest.sha256(img)
    for args, words in [
            (["io", "--key-secret", "wrong", img, "-c", "write -P 1 0 4096"], ["invalid password"]),
            (["io", *secret(pw="nope"), img, "-c", "write 0 512"], ["invalid password"]),
            (["io", img, "-c", "write 0 512"], ["encrypted", "key"]),
            (["convert", "-O", "raw", img, os.path.join(d, "x.raw")], ["encrypted", "key"]),
            (["map", "--key-secret", "wrong", img], ["invalid password"])]:
        p = uqtest.uq(*args, check=False)
        err = one_line_error(p, words, img)
        if err:
            return f"{args[0]}: {err}"
        if uqtest.sha256(img) != before:
            return f"{args[0]} with a wrong key changed the image"
    return None


def case_legacy_aes(d):
    img = os.path.join(d, "aes.qcow2")
    p = uqtest.qemu_img("create", "-q", *secret(), "-f", "qcow2", "-o",
                        "encrypt.format=aes,encrypt.key-secret=sec0", img, "4M", check=False)
    if p.returncode != 0:
        return "SKIP: this qemu-img cannot create legacy AES images: " + p.stderr.strip()
    qemu_io_enc(img, ["write -P 0x5a 0 100k", "write -P 0x11 300k 7k", "write -z 64k 4k"])
    ref, ours = os.path.join(d, "aes.ref.raw"), os.path.join(d, "aes.our.raw")
    qemu_raw(img, ref)
    before = uqtest.sha256(img)
    uqtest.uq("convert", "--key-secret", PW, "-O", "raw", img, ours)
    diff = uqtest.first_difference(ref, ours)
    if diff:
        return f"legacy AES: convert -O raw differs from qemu-img's: {diff}"
    p = uqtest.uq("io", "--key-secret", PW, "-r", img, "-c", "read -P 0x11 300k 7k", check=False)
    if p.returncode != 0:
        return f"legacy AES: io -r failed: {p.stderr}"
    p = uqtest.uq("io", "--key-secret", PW, img, "-c", "write 0 512", check=False)
    err = one_line_error(p, ["legacy AES", "read-only", "convert"], img)
    if err:
        return "legacy AES read-write: " + err
    if uqtest.sha256(img) != before:
        return "legacy AES: the image changed"
    info = our_info(img)
    if info["format-specific"]["data"].get("encrypt") != {"format": "aes"}:
        return f"legacy AES info: {info}"
    return None


def case_bad_header(d):
    """Damage the LUKS header area the crypto extension points at."""
    base = os.path.join(d, "bh.qcow2")
    qemu_create_luks(base, 1 * MiB, "", 65536)
    with open(base, "rb") as f:
        data = bytearray(f.read())
    hlen = int.from_bytes(data[100:104], "big")
    off = hlen
    while True:
        t, n = int.from_bytes(data[off:off + 4], "big"), int.from_bytes(data[off + 4:off + 8], "big")
        if t == 0x0537be77:
            luks = int.from_bytes(data[off + 8:off + 16], "big")
            break
        if t == 0:
            return "no crypto header extension in a qemu-img LUKS image"
        off += 8 + (n + 7) // 8 * 8
    cases = [
        ("unknown cipher", luks + 8, b"camellia\0", ["unsupported cipher", "camellia"]),
        ("sm4", luks + 8, b"sm4\0", ["unsupported cipher", "sm4"]),
        ("bad mode", luks + 40, b"gcm-plain64\0", ["cipher mode"]),
        ("bad hash", luks + 72, b"whirlpool\0", ["hash"]),
        ("key bytes", luks + 108, (1000).to_bytes(4, "big"), ["key size"]),
        ("key material offset", luks + 208 + 40, (0x7fffffff).to_bytes(4, "big"),
         ["key slot 0"]),
        ("magic", luks, b"XXXX", ["LUKS"]),
        ("extension offset", off + 8, (1 << 40).to_bytes(8, "big"), ["encryption header"]),
    ]
    for name, pos, patch, words in cases:
        img = os.path.join(d, "bh-x.qcow2")
        bad = bytearray(data)
        bad[pos:pos + len(patch)] = patch
        with open(img, "wb") as f:
            f.write(bad)
        p = uqtest.uq("convert", "--key-secret", PW, "-O", "raw", img,
                      os.path.join(d, "bh.raw"), check=False)
        err = one_line_error(p, words, img)
        if err:
            return f"{name}: {err}"
    return None


def main():
    uqtest.require_tools("qemu-img", "qemu-io")
    uqtest.uq_bin()
    base = uqtest.base_seed()
    res = uqtest.Results("test_luks")
    d = uqtest.scratch_dir("luks")
    try:
        for i, (name, enc, cluster, compat) in enumerate(QEMU_CONFIGS):
            res.case(f"qemu-made {name}: read like qemu-img", case_qemu_made, d, i, enc,
                     cluster, compat)
        for i, (name, enc, cluster, compat) in enumerate(QEMU_CONFIGS):
            seed = base * 100 + i
            res.case(f"qemu-made {name}: random io (seed {seed})", case_qemu_random, d, i,
                     enc, cluster, compat, seed)
        for i, (name, enc, cluster) in enumerate(OUR_CONFIGS):
            seed = base * 100 + 50 + i
            res.case(f"{name}: qemu reads it, random io (seed {seed})", case_ours, d, i, enc,
                     cluster, seed)
        for i, (mode, cluster) in enumerate((("metadata", 65536), ("falloc", 4096),
                                             ("full", 65536))):
            seed = base * 100 + 60 + i
            res.case(f"create preallocation={mode} c{cluster} (seed {seed})", case_prealloc, d,
                     mode, cluster, seed)
        res.case("convert -o encrypt.format=luks", case_convert_encrypt, d)
        res.case("wrong or missing key", case_wrong_key, d)
        err = None
        try:
            err = case_legacy_aes(d)
        except (uqtest.CommandError, AssertionError, OSError, ValueError) as e:
            err = str(e)
        if err and err.startswith("SKIP: "):
            res.skip("legacy AES", err[6:])
        elif err:
            res.fail("legacy AES read-only", err)
        else:
            res.ok("legacy AES read-only")
        res.case("damaged LUKS headers", case_bad_header, d)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    sys.exit(main())
