"""A private view of the file system that holds only the given trees and files (standard library only).

Why, on top of Landlock (:mod:`broker.landlock`): Landlock decides who may open, create,
remove and rename, but not who may ``stat``, ``chmod``, ``chown`` or set times. A login-side
sftp-server could still change the mode of one of the user's files in the login node's
``/tmp``, or answer ``ls -l /tmp/x`` from the login node, where the session would have used
its own node's ``/tmp``. In this view those paths do not exist at all.

How: an unprivileged user namespace (the user's own uid and gid mapped to themselves) with a
mount namespace; a tmpfs becomes the root, the trees and the server's files are bind-mounted
at their own paths (files read-only), and the process ``chroot``s into it. Each tree is opened
without following any symlink first and mounted from that open file, so what is mounted is
what was checked. Nothing outside the process changes; the namespace ends with it.

In the view, files of other users show as owned by the overflow uid (``nobody``): only the
user's own ids are mapped, as in an unprivileged container.
"""

from __future__ import annotations

import ctypes
import os

from .landlock import LandlockError, libc as _libc, open_beneath_no_symlinks

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
#: Where the new root is assembled (a tmpfs mounted over it, in the private namespace only).
STAGE = "/tmp"


class ViewError(Exception):
    """The view could not be made."""


def _mount(libc: ctypes.CDLL, source: str | None, target: str, fstype: str | None, flags: int,
           data: bytes | None = None) -> None:
    if libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                  ctypes.c_ulong(flags), data) != 0:
        err = ctypes.get_errno()
        raise ViewError(f"mount {source or ''} on {target}: {os.strerror(err)}")


def _read_only(libc: ctypes.CDLL, target: str) -> None:
    """Remount a bind mount read-only, keeping the flags the kernel locks in a user namespace
    (a remount that dropped the source's nosuid, nodev, noexec or atime flags is refused)."""
    kept = os.statvfs(target).f_flag & (os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC | os.ST_NOATIME
                                        | os.ST_NODIRATIME)
    relatime = MS_RELATIME if os.statvfs(target).f_flag & os.ST_RELATIME else 0
    _mount(libc, None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | kept | relatime)


def enter_namespace() -> None:
    """A new user and mount namespace, the user's ids mapped to themselves. Raises
    :class:`ViewError` (the process unchanged) when unprivileged namespaces are off."""
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        raise ViewError(f"unshare: {os.strerror(ctypes.get_errno())}")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)


def build(trees: list[tuple[str, bool]], files: list[str], writable_files: list[str] = ()) -> None:
    """Make the view of ``trees`` (path, writable) and ``files`` and ``chroot`` into it; call
    after :func:`enter_namespace`. A tree that does not exist, or is reached through a symlink,
    is left out; so is a missing file."""
    libc = _libc()
    opened: list[tuple[str, bool, int]] = []  # opened before the stage covers anything
    outer: list[str] = []
    for path, writable in sorted(trees):
        if any(path == o or path.startswith(o.rstrip("/") + "/") for o in outer):
            continue  # inside a tree already taken (xferroute: with the same mode)
        try:
            opened.append((path, writable, open_beneath_no_symlinks(path)))
        except (OSError, LandlockError):
            continue
        outer.append(path)
    try:
        _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
        _mount(libc, "tmpfs", STAGE, "tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755")
        for path, writable, fd in opened:
            os.makedirs(STAGE + path, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{fd}", STAGE + path, None, MS_BIND | MS_REC)
            if not writable:
                _read_only(libc, STAGE + path)
        for path in [*files, *writable_files]:
            if not os.path.exists(path) or any(path.startswith(o.rstrip("/") + "/") for o in outer):
                continue
            target = STAGE + path
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
            _mount(libc, path, target, None, MS_BIND)
            if path not in writable_files:
                _read_only(libc, target)
    finally:
        for _, _, fd in opened:
            os.close(fd)
    os.chdir(STAGE)
    if libc.chroot(b".") != 0:
        raise ViewError(f"chroot: {os.strerror(ctypes.get_errno())}")
    os.chdir("/")
