"""Landlock (Linux >= 5.13): a process confines itself to the files it names (standard library only).

Why: ``sbroker login`` serves a transfer on the login node (:mod:`broker.loginxfer`) only
inside the paths the session sees at the same place on shared storage. Landlock lets the
user's own, unprivileged process drop every other file access before it execs the transfer
server, and the kernel checks the *resolved* path of every open, so a symlink in the home
pointing at the login node's ``/tmp`` is refused, not followed to the wrong machine. Rules
only ever shrink what the process and its children may do; nothing can lift them.

Only the syscalls are here (``landlock_create_ruleset``, ``landlock_add_rule``,
``landlock_restrict_self``, by number: glibc has no wrappers); :func:`confine` is the one
entry point.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct

_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2: rename and link between directories
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

#: What may be done to a file itself (a rule on a file may grant nothing else).
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ = READ_FILE | READ_DIR
#: Everything a transfer server does in a tree it may write: no EXECUTE, no devices.
WRITE = (READ | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM | REFER | TRUNCATE)
#: The oldest ABI :func:`confine` accepts: without REFER (ABI 2) every rename between two
#: directories is refused, which breaks sftp's ``rename`` and rsync's temporary files.
MIN_ABI = 2


class LandlockError(Exception):
    """The kernel has no usable Landlock, or a rule could not be made."""


def libc() -> ctypes.CDLL:
    """This process's C library, with errno kept (also :mod:`broker.mountview`'s)."""
    return ctypes.CDLL(None, use_errno=True)


def abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (not built, or not enabled)."""
    lib = libc()
    lib.syscall.restype = ctypes.c_long
    version = lib.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def handled_rights(version: int) -> int:
    """Every filesystem right the kernel of ``version`` knows: all of them are handled (denied
    unless a rule grants them)."""
    rights = (1 << 13) - 1
    if version >= 2:
        rights |= REFER
    if version >= 3:
        rights |= TRUNCATE
    if version >= 5:
        rights |= IOCTL_DEV
    return rights


def open_beneath_no_symlinks(path: str) -> int:
    """An ``O_PATH`` fd of ``path``, refusing any symlink on the way (``ELOOP``/``ENOTDIR``).

    Why component by component: a rule is made on whatever the path resolves to *now*, and a
    directory of the user's own (the project dir in the home) could be a symlink to a place
    the session does not see there. Refusing it makes that path a refusal, never a wrong answer.
    """
    if not path.startswith("/"):
        raise LandlockError(f"{path}: must be an absolute path")
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = [p for p in path.split("/") if p and p != "."]
        for i, part in enumerate(parts):
            if part == "..":
                raise LandlockError(f"{path}: must not contain '..'")
            last = i == len(parts) - 1
            flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
            nxt = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def confine(trees: list[tuple[str, int]], files: list[tuple[str, int]]) -> int:
    """Restrict this process (and what it execs) to ``trees`` (directories, with the rights
    given beneath them) and ``files`` (single files, with file rights). Returns the ABI used.

    A tree that cannot be opened without a symlink, or does not exist, is left out (so it is
    refused). A file that does not exist is left out. Raises :class:`LandlockError` when the
    kernel's Landlock is missing or older than :data:`MIN_ABI`, or a syscall fails; the
    process is then unchanged.
    """
    version = abi()
    if version < MIN_ABI:
        raise LandlockError(f"the kernel's Landlock ABI is {version}; at least {MIN_ABI} is needed")
    lib = libc()
    lib.syscall.restype = ctypes.c_long
    handled = handled_rights(version)
    attr = struct.pack("=Q", handled)  # landlock_ruleset_attr: handled_access_fs (ABI < 4 size)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = lib.syscall(_SYS_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        err = ctypes.get_errno()
        raise LandlockError(f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        for path, rights, is_tree in [*((p, r, True) for p, r in trees), *((p, r, False) for p, r in files)]:
            try:
                fd = open_beneath_no_symlinks(path) if is_tree else os.open(path, os.O_PATH | os.O_CLOEXEC)
            except (OSError, LandlockError):
                continue  # absent, or reached through a symlink: refused
            try:
                is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
                granted = rights & handled & (handled if is_dir else FILE_RIGHTS)
                # landlock_path_beneath_attr is packed: u64 allowed_access, s32 parent_fd.
                rule = ctypes.create_string_buffer(struct.pack("=Qi", granted, fd), 12)
                if granted and lib.syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH),
                                            rule, ctypes.c_uint32(0)) < 0:
                    err = ctypes.get_errno()
                    raise LandlockError(f"landlock_add_rule {path}: {os.strerror(err)}")
            finally:
                os.close(fd)
        if lib.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise LandlockError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
        if lib.syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
            raise LandlockError(f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(ruleset)
    return version
