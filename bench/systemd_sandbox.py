"""Run a command under the seccomp filters that docs/deployment.md's systemd unit asks for,
without systemd: a check that sydent_lite still works with them (Linux, libseccomp 2.5).

    python bench/systemd_sandbox.py python -m pytest -q tests/test_bind_lookup.py ...

Built as systemd 252 builds them (src/shared/seccomp-util.c):
- SystemCallFilter=@system-service ~@privileged: an allow list, everything else EPERM
  (the sets as `systemd-analyze syscall-filter` lists them, groups expanded);
- MemoryDenyWriteExecute=true: no mapping both writable and executable, no mprotect or
  shmat making memory executable;
- RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX: socket() of any other family fails
  with EAFNOSUPPORT;
- RestrictNamespaces=true: no unshare or setns, no clone with a CLONE_NEW* flag (clone3,
  whose flags a filter cannot read, answers ENOSYS and libc falls back to clone);
- NoNewPrivileges=true.
Filters are inherited by every child and survive exec, as under systemd. LockPersonality
and the file-system, device and user-namespace settings are not reproduced.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys

_lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
_lib.seccomp_init.restype = ctypes.c_void_p
_lib.seccomp_init.argtypes = [ctypes.c_uint32]
_lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
_lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
_lib.seccomp_load.argtypes = [ctypes.c_void_p]

ALLOW = 0x7FFF0000
CMP_EQ, CMP_MASKED_EQ = 4, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
CLONE_NEW_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)
PR_SET_NO_NEW_PRIVS = 38


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


def errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def add_rule(ctx: int, action: int, name: str, *cmps: tuple[int, int, int, int]) -> bool:
    """One rule; False for a system call this architecture does not have."""
    nr = _lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        return False
    array = (_ArgCmp * len(cmps))(*[_ArgCmp(*c) for c in cmps]) if cmps else None
    rc = _lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
    if rc < 0 and rc != -errno.EEXIST:
        raise OSError(-rc, f"seccomp rule for {name}")
    return True


def syscall_set(name: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a systemd set (`@system-service`), nested sets expanded."""
    seen = set() if seen is None else seen
    listing = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True)
    calls: set[str] = set()
    for line in listing.stdout.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("@"):
            if item not in seen:
                seen.add(item)
                calls |= syscall_set(item, seen)
        else:
            calls.add(item)
    return calls


def build_filters() -> tuple[int, int, int]:
    """(restrictions, allow list, number of system calls allowed)."""
    allowed = (syscall_set("@system-service") - syscall_set("@privileged")) | syscall_set("@default")
    allow_list = _lib.seccomp_init(errno_action(errno.EPERM))
    count = sum(add_rule(allow_list, ALLOW, name) for name in sorted(allowed))

    restrictions = _lib.seccomp_init(ALLOW)
    eperm = errno_action(errno.EPERM)
    add_rule(restrictions, eperm, "mmap", (2, CMP_MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC))
    add_rule(restrictions, eperm, "mprotect", (2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
    add_rule(restrictions, eperm, "pkey_mprotect", (2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
    add_rule(restrictions, eperm, "shmat", (2, CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
    for family in range(64):
        if family not in (AF_UNIX, AF_INET, AF_INET6):
            add_rule(restrictions, errno_action(errno.EAFNOSUPPORT), "socket", (0, CMP_EQ, family, 0))
    for name in ("unshare", "setns"):
        add_rule(restrictions, eperm, name)
    for flag in CLONE_NEW_FLAGS:
        add_rule(restrictions, eperm, "clone", (0, CMP_MASKED_EQ, flag, flag))
    add_rule(restrictions, errno_action(errno.ENOSYS), "clone3")
    return restrictions, allow_list, count


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    restrictions, allow_list, count = build_filters()
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    # The restrictions first: the allow list does not allow seccomp() itself.
    for what, ctx in (("restrictions", restrictions), ("allow list", allow_list)):
        rc = _lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, f"loading the {what}")
    print(f"systemd_sandbox: {count} system calls allowed; W^X; AF_INET/AF_INET6/AF_UNIX", file=sys.stderr, flush=True)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
