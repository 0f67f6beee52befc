#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Logging: quiet by default (a command that succeeds writes nothing on
stderr), -v (before the command) adds "ublk-qcow2: debug: ..." lines on
stderr without changing stdout, and an error is one "ublk-qcow2: ..." line
on stderr with a nonzero exit, -v or not. (A detached daemon's syslog
lines are checked in the VM: tests/vm/guest.sh, scenario gpt.)"""

import uqtest

DEBUG = "ublk-qcow2: debug: "


def main():
    uqtest.require_tools("qemu-img")
    uqtest.uq_bin()
    res = uqtest.Results("logging")
    d = uqtest.scratch_dir("log")
    try:
        img = f"{d}/a.qcow2"
        cmds = [
            ["create", "-f", "qcow2", img, "16M"],
            ["io", "-c", "write -P 0x5a 0 64k", img],
            ["info", img],
            ["check", img],
            ["map", "--output=json", img],
            ["convert", "-O", "raw", img, f"{d}/a.raw"],
            ["snapshot", "-c", "s1", img],
            ["resize", img, "+1M"],
        ]

        def quiet_and_verbose(args):
            p = uqtest.uq(*args)
            if p.stderr:
                return f"stderr without -v: {p.stderr!r}"
            # run twice: snapshot -c wants a new name (the argument only: the
            # scratch dir's random name may hold "s1" too)
            v = uqtest.uq("-v", *["s2" if a == "s1" else a for a in args])
            lines = v.stderr.splitlines()
            if not lines or any(not l.startswith(DEBUG) for l in lines):
                return f"-v stderr is not debug lines only: {v.stderr!r}"
            # the same work again prints the same (sizes, names), but
            # create and convert print what they made: compare those only
            if args[0] in ("info", "check", "map") and v.stdout != p.stdout:
                return "-v changed stdout"

        for args in cmds:
            res.case("quiet, -v: " + args[0], quiet_and_verbose, args)

        def error_line(verbose):
            pre = ["-v"] if verbose else []
            p = uqtest.uq(*pre, "info", f"{d}/missing.qcow2", check=False)
            errs = [l for l in p.stderr.splitlines() if not l.startswith(DEBUG)]
            if p.returncode == 0 or len(errs) != 1 or "missing.qcow2" not in errs[0] \
                    or not errs[0].startswith("ublk-qcow2: "):
                return f"exit {p.returncode}, stderr {p.stderr!r}"

        res.case("error line", error_line, False)
        res.case("error line with -v", error_line, True)
    finally:
        uqtest.cleanup(d)
    res.finish()


if __name__ == "__main__":
    main()
