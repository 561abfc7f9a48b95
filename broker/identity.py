"""Who is asking: Unix identities from ``SO_PEERCRED`` and the passwd/group databases.

A request never names the user it acts for. The daemon reads the peer's uid from
the socket and looks everything else up here, server side.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class User:
    """A local account, resolved from its uid."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str


class UnknownUser(LookupError):
    """The uid has no passwd entry (a deleted account, or a container's uid)."""


def peer_uid(sock: socket.socket) -> tuple[int, int, int]:
    """Return ``(pid, uid, gid)`` of the process on the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def lookup_uid(uid: int) -> User:
    """Resolve ``uid`` to a :class:`User` with its supplementary groups."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise UnknownUser(f"uid {uid} has no passwd entry") from None
    return _from_pwd(entry)


def lookup_name(name: str) -> User:
    """Resolve a user name (for admin tools and tests; never from a client's word)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise UnknownUser(f"user {name!r} does not exist") from None
    return _from_pwd(entry)


def _from_pwd(entry: pwd.struct_passwd) -> User:
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir, entry.pw_shell)


def in_group(user: User, group: str) -> bool:
    """True if ``user`` is a member (primary or supplementary) of ``group``."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return False
    return gid in user.groups or user.uid == 0
