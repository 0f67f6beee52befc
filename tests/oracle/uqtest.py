# SPDX-License-Identifier: MIT
"""Shared helpers for the oracle tests: find the tools, run commands, make
scratch directories, compare files, and collect results so one failing case
does not hide the others.

Environment:
  UQ_BIN       path of the ublk-qcow2 binary (ctest sets it; else build/)
  UQ_SANITIZE  1 when the binary is an ASan/UBSan build (ctest sets it)
  UQ_KEEP      1: keep the scratch directory for a look after the run
  UQ_VERBOSE   1: print every command
"""

import hashlib
import json
import os
import random
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile

SKIP = 77
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(TOP, "tests", "images"))

VERBOSE = os.environ.get("UQ_VERBOSE") == "1"
SANITIZED = os.environ.get("UQ_SANITIZE", "0") in ("1", "ON", "on", "true")


def skip(reason):
    """Skip the whole test: only for a tool that is genuinely missing."""
    print(f"SKIP: {reason}", flush=True)
    sys.exit(SKIP)


def require_tools(*names):
    for n in names:
        if shutil.which(n) is None:
            skip(f"{n} not found in PATH")


def uq_bin():
    b = os.environ.get("UQ_BIN") or os.path.join(TOP, "build", "ublk-qcow2")
    if not os.access(b, os.X_OK):
        print(f"FAIL: ublk-qcow2 binary {b} does not exist (build it first)", flush=True)
        sys.exit(1)
    return b


class CommandError(Exception):
    pass


def run(args, check=True, input=None, env=None, mem_limit=None, timeout=900, cwd=None):
    """Run @args; returns CompletedProcess with text stdout/stderr.
    @mem_limit: bytes of address space (RLIMIT_AS), or under a sanitizer
    the equivalent allocator limits (ASan reserves terabytes of address
    space, so RLIMIT_AS cannot be used there)."""
    args = [str(a) for a in args]
    if VERBOSE:
        print("+ " + shlex.join(args), flush=True)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    preexec = None
    if mem_limit:
        if SANITIZED:
            mb = mem_limit >> 20
            full_env["ASAN_OPTIONS"] = (full_env.get("ASAN_OPTIONS", "") +
                                        f":max_allocation_size_mb={mb}"
                                        f":hard_rss_limit_mb={mb}"
                                        ":allocator_may_return_null=1").lstrip(":")
        else:
            def preexec():
                resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    p = subprocess.run(args, input=input, capture_output=True, text=True,
                       env=full_env, preexec_fn=preexec, timeout=timeout, cwd=cwd)
    if check and p.returncode != 0:
        raise CommandError(f"command failed (exit {p.returncode}): {shlex.join(args)}\n"
                           f"--- stdout:\n{tail(p.stdout)}--- stderr:\n{tail(p.stderr)}")
    return p


def tail(text, lines=30):
    t = text.splitlines()[-lines:]
    return "".join(l + "\n" for l in t)


def uq(*args, **kw):
    return run([uq_bin()] + list(args), **kw)


def qemu_img(*args, **kw):
    return run(["qemu-img"] + list(args), **kw)


def qemu_img_luks(*args, cwd=None):
    """qemu-img @args making a LUKS image: its PBKDF2 benchmark fails now and
    then on a loaded machine ("Unable to get accurate CPU usage"), which is
    not ours to test, so that failure gets five tries."""
    for _ in range(5):
        p = qemu_img(*args, check=False, cwd=cwd)
        if p.returncode == 0 or "accurate CPU usage" not in p.stderr:
            break
    if p.returncode != 0:
        raise CommandError(f"qemu-img {' '.join(args)} failed: {p.stderr.strip()}")
    return p


def qemu_check_clean(when, *args):
    """qemu-img check --output=json @args: None when it exits 0 and finds no
    corruptions, leaks or check errors, else one message naming @when."""
    p = qemu_img("check", "--output=json", *args, check=False, input="")
    try:
        r = json.loads(p.stdout)
    except ValueError:
        return f"qemu-img check {when}: exit {p.returncode}, no JSON: {p.stderr.strip()}"
    bad = {k: r.get(k, 0) for k in ("corruptions", "leaks", "check-errors") if r.get(k, 0)}
    if p.returncode != 0 or bad:
        return f"qemu-img check {when}: exit {p.returncode}, {bad or r}\n{p.stderr.strip()}"
    return None


def compare_clean(tag, ref, ours):
    """qemu-img compare @ref @ours, then qemu-img check of @ours: None, or
    what is wrong, prefixed with @tag."""
    p = qemu_img("compare", ref, ours, check=False)
    if p.returncode != 0:
        return f"{tag}: {(p.stdout + p.stderr).strip()}"
    return qemu_check_clean(tag, ours)


def qemu_io(fmt, image, cmds, extra=(), **kw):
    """Run qemu-io commands @cmds on @image; qemu-io exits 0 even when a
    command fails, so its output is checked for failure words too."""
    args = ["qemu-io", "-f", fmt] + list(extra)
    for c in cmds:
        args += ["-c", c]
    args.append(image)
    p = run(args, **kw)
    bad = [l for l in (p.stdout + p.stderr).splitlines()
           if "failed" in l or "error" in l.lower()]
    if bad and kw.get("check", True):
        raise CommandError(f"qemu-io reported: {bad[0]} ({shlex.join(args[:8])} ...)")
    return p


def qemu_create(path, size, **opts):
    """qemu-img create -f qcow2 -o k=v,... path size"""
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    args = ["create", "-q", "-f", "qcow2"]
    if o:
        args += ["-o", o]
    qemu_img(*args, path, str(size))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_mismatch(ours, ref, who):
    """None if @ours has @ref's bytes and size, else what differs (@who made @ref)."""
    diff = first_difference(ref, ours)
    if diff is None and os.path.getsize(ours) == os.path.getsize(ref):
        return None
    return (f"file differs from {who}'s ({diff}; sizes {os.path.getsize(ours)} "
            f"and {os.path.getsize(ref)})")


def first_difference(a, b, chunk=4 << 20):
    """None if files @a and @b are identical, else a description of the
    first difference."""
    if shutil.which("cmp"):		# diffutils is three times faster
        if subprocess.run(["cmp", "-s", a, b]).returncode == 0:
            return None
    sa, sb = os.path.getsize(a), os.path.getsize(b)
    ba, bb = bytearray(chunk), bytearray(chunk)
    ma, mb = memoryview(ba), memoryview(bb)
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        off = 0
        while True:
            na, nb = fa.readinto(ba), fb.readinto(bb)
            if ma[:na] != mb[:nb]:
                for i in range(min(na, nb)):
                    if ba[i] != bb[i]:
                        return (f"first difference at byte {off + i:#x}: "
                                f"{ba[i]:#04x} vs {bb[i]:#04x}")
                return f"sizes differ: {sa} vs {sb} bytes"
            if not na:
                return None
            off += na


def base_seed(also=""):
    """UQ_SEED (default 1; "random" picks one), printed with how to reproduce
    the run (@also: more NAME=VALUE settings to repeat)."""
    s = os.environ.get("UQ_SEED", "1")
    seed = random.SystemRandom().randint(1, 1 << 31) if s == "random" else int(s)
    extra = f" {also}" if also else ""
    print(f"seed={seed}{extra} (reproduce with UQ_SEED={seed}{extra})", flush=True)
    return seed


def scratch_dir(name):
    """A fresh directory on tmpfs when there is one; remove with cleanup()."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix=f"uq-{name}-", dir=base)


def cleanup(path):
    if os.environ.get("UQ_KEEP") == "1":
        print(f"(kept {path})")
    else:
        shutil.rmtree(path, ignore_errors=True)


class Results:
    """Collects case outcomes; finish() prints a summary and exits."""

    def __init__(self, name):
        self.name = name
        self.passed = []
        self.failed = []
        self.skipped = []

    def ok(self, case):
        self.passed.append(case)
        print(f"ok    {case}", flush=True)

    def fail(self, case, why):
        self.failed.append(case)
        print(f"FAIL  {case}\n      " + str(why).replace("\n", "\n      "), flush=True)

    def skip(self, case, why):
        """A case that cannot exist (e.g. an invalid option combination)."""
        self.skipped.append(case)
        print(f"skip  {case}: {why}", flush=True)

    def case(self, name, fn, *args):
        """Run fn(*args); an exception or a returned message fails the case."""
        try:
            err = fn(*args)
        except (CommandError, AssertionError, OSError, ValueError,
                subprocess.TimeoutExpired) as e:
            err = str(e) or type(e).__name__
        if err:
            self.fail(name, err)
        else:
            self.ok(name)

    def each_in_scratch(self, prefix, cases):
        """Run each (name, fn) of @cases as fn(dir), a fresh scratch dir each."""
        for name, fn in cases:
            d = scratch_dir(prefix)
            try:
                self.case(name, fn, d)
            finally:
                cleanup(d)

    def finish(self):
        print(f"\n{self.name}: {len(self.passed)} passed, {len(self.failed)} failed, "
              f"{len(self.skipped)} not applicable", flush=True)
        if not self.passed and not self.failed:
            print(f"{self.name}: nothing ran; that is not a pass")
            sys.exit(1)
        sys.exit(1 if self.failed else 0)
