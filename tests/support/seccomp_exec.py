"""Loads a Docker-format seccomp profile with libseccomp and execs a program under it.

Usage: /usr/bin/python3 seccomp_exec.py PROFILE.json [--drop NAME,NAME...] -- PROGRAM ARGS...

Used by tests/deploy.rs to run the real geobeat binary under deploy/seccomp-geobeat.json, the
way a container engine would (the filter is installed before exec and inherited by every
thread), and under the same profile without the io_uring calls (as Docker >= 25's default has
them). Needs Debian's python3-seccomp. The native architecture only; names this libseccomp does
not know are skipped (as the engines do); `--drop` removes names from every rule.
"""

import errno
import json
import os
import platform
import sys

import seccomp

OPS = {
    "SCMP_CMP_EQ": seccomp.EQ,
    "SCMP_CMP_NE": seccomp.NE,
    "SCMP_CMP_LT": seccomp.LT,
    "SCMP_CMP_LE": seccomp.LE,
    "SCMP_CMP_GT": seccomp.GT,
    "SCMP_CMP_GE": seccomp.GE,
    "SCMP_CMP_MASKED_EQ": seccomp.MASKED_EQ,
}
# The engines' names for the native architecture.
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]


def action(rule_or_profile, key, errno_key):
    name = rule_or_profile[key]
    if name == "SCMP_ACT_ALLOW":
        return seccomp.ALLOW
    if name == "SCMP_ACT_ERRNO":
        return seccomp.ERRNO(rule_or_profile.get(errno_key, errno.EPERM))
    raise SystemExit(f"unsupported action {name}")


def main():
    argv = sys.argv[1:]
    sep = argv.index("--")
    opts, program = argv[:sep], argv[sep + 1 :]
    profile = json.load(open(opts[0]))
    drop = set()
    if "--drop" in opts:
        drop = set(opts[opts.index("--drop") + 1].split(","))
    f = seccomp.SyscallFilter(defaction=action(profile, "defaultAction", "defaultErrnoRet"))
    for rule in profile["syscalls"]:
        arches = rule.get("includes", {}).get("arches")
        if arches is not None and ARCH not in arches:
            continue
        act = action(rule, "action", "errnoRet")
        args = [
            seccomp.Arg(a["index"], OPS[a["op"]], a["value"], a.get("valueTwo", 0))
            for a in rule.get("args", [])
        ]
        for name in rule["names"]:
            if name in drop:
                continue
            try:
                f.add_rule(act, name, *args)
            except (RuntimeError, ValueError, OSError):
                pass  # not a system call on this architecture or libseccomp version
    f.load()
    os.execv(program[0], program)


main()
