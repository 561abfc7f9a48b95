"""Reading users' own files (job logs in their homes) with the user's file-system identity.

Session job files live where both the login node and the compute nodes can reach them,
usually the user's home: a directory the user owns and can fill with symlinks, FIFOs or
huge files. Root must never resolve such a path with its own rights (a symlink to
``/etc/shadow`` would be read and shown back), and on root-squashed NFS root cannot read
it at all. So the daemon opens these files with the user's file-system uid and gid
(``setfsuid``/``setfsgid``, per thread on Linux): the kernel checks every path component
exactly as it would for the user, and root's capabilities do not apply while the fsuid is
not 0. Supplementary groups stay the daemon's own, which :func:`drop_groups` empties at
start.

Calls are synchronous and bounded (``size``); the daemon runs them in a worker thread
(``anyio.to_thread``) so a slow NFS server or a huge file never stalls the event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
from collections.abc import Iterator

from .identity import User

_libc = ctypes.CDLL(None, use_errno=True)


class IdentityError(OSError):
    """The thread could not take (or give back) the user's file-system identity."""


def drop_groups() -> None:
    """Empty root's supplementary groups, so fs access as a user carries none of root's."""
    if os.geteuid() == 0:
        os.setgroups([])


def _set(uid: int, gid: int) -> None:
    # setfsgid/setfsuid return the previous id and never fail loudly: check by reading back.
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    if _libc.setfsuid(-1) != uid or _libc.setfsgid(-1) != gid:
        raise IdentityError(f"could not switch the file-system identity to {uid}:{gid}")


@contextlib.contextmanager
def identity(user: User) -> Iterator[None]:
    """Within the block, this thread opens files as ``user`` (no-op unless run as root)."""
    if os.geteuid() != 0 or user.uid == 0:
        yield
        return
    _set(user.uid, user.gid)
    try:
        yield
    finally:
        _set(0, 0)


def read_from(user: User, path: str, offset: int, size: int) -> tuple[bytes, int]:
    """Up to ``size`` bytes of the regular file ``path`` from ``offset``, read as ``user``.

    ``offset=-1`` means the last ``size`` bytes. Returns ``(data, end_offset)``; a file that
    is missing, unreadable or not a regular file reads as empty (``b"", 0``), because
    its content is only ever advisory (markers, logs shown back to the same user).
    """
    if not path:
        return b"", 0
    with identity(user):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            return b"", 0
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return b"", 0
        end = st.st_size
        start = max(0, end - size) if offset < 0 else min(offset, end)
        data = os.pread(fd, min(size, end - start), start)
    except OSError:
        return b"", 0
    finally:
        os.close(fd)
    return data, start + len(data)


def exists(user: User, path: str) -> bool:
    """Whether ``user`` can see ``path`` (as a regular file)."""
    with identity(user):
        try:
            return stat.S_ISREG(os.stat(path).st_mode)
        except OSError:
            return False
