"""The libraries of the login node's transfer servers, listed by the daemon (root, login node).

Why: a transfer served on the login node runs in a private view that holds the server's
own libraries and nothing else (:mod:`broker.loginxfer`). Listing them is the dynamic
loader's trace mode, ``ldd``'s way: a fork and an exec that cost the login client ~3 ms of
every ``scp``. The four servers (sftp-server, scp, rsync, cat) are the same binaries for
every user, so the daemon lists each once and sends the list with the route. A list is
used only while the binary and the loader's cache are the files it was made from (their
stat); otherwise the login client lists for itself, as the user, while the daemon makes a
new one in the background: a reply never waits for a listing.

Root runs a binary's loader only when no one but root can have changed it: the binary and
every directory on its path are root's and written by no one else. A server installed
anywhere else keeps being listed by the login client, as its user.
"""

from __future__ import annotations

import asyncio
import os
import stat

from . import log as _log
from .loginxfer import LIST_TIMEOUT, parse_libraries

#: The loader resolves library names through this cache: a new one can change every list.
LOADER_CACHE = "/etc/ld.so.cache"

Stamp = tuple[tuple[int, int, int, int] | None, ...]


def _stamp(*paths: str) -> Stamp:
    """What changes when any of ``paths`` is replaced, rewritten, or given a new mode or owner."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns))  # ctime: contents, mode, owner
    return tuple(out)


def root_only(path: str) -> bool:
    """Whether ``path`` and every directory it is reached through, before and after its
    symlinks are resolved, are owned by root and writable by no one else."""
    checked = set()
    for chain, look in ((path, os.lstat), (os.path.realpath(path), os.stat)):
        parts = chain.split("/")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth]) or "/"
            if (prefix, look) in checked:
                continue
            checked.add((prefix, look))
            try:
                st = look(prefix)
            except OSError:
                return False
            if st.st_uid != 0 or (st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not stat.S_ISLNK(st.st_mode)):
                return False
    return True


class Libraries:
    """Each transfer server's library list, made once per version of the binary."""

    def __init__(self) -> None:
        self.log = _log.get("sbroker.xferlibs")
        self.lists: dict[str, tuple[Stamp, list[str]]] = {}
        self.refused: dict[str, Stamp] = {}  # binaries not root's alone, as they were then
        self.tasks: set[asyncio.Task[None]] = set()

    def get(self, binary: str) -> list[str] | None:
        """The current list for ``binary``, or None (and a listing started, if allowed)."""
        stamp = _stamp(binary, LOADER_CACHE)
        known = self.lists.get(binary)
        if known is not None and known[0] == stamp:
            return known[1]
        if self.refused.get(binary) != stamp and not any(t.get_name() == binary for t in self.tasks):
            task = asyncio.get_running_loop().create_task(self.refresh(binary, stamp), name=binary)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return None

    async def refresh(self, binary: str, stamp: Stamp) -> None:
        """List ``binary``'s libraries as they are at ``stamp`` (bounded by LIST_TIMEOUT)."""
        if not root_only(binary):
            self.refused[binary] = stamp
            self.log.warning("transfer_libraries_not_listed", binary=binary,
                             reason="not root's alone (the binary or a directory above it); "
                                    "the login client lists them as the user")
            return
        proc = await asyncio.create_subprocess_exec(
            binary, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env={"LD_TRACE_LOADED_OBJECTS": "1"}, cwd="/")
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), LIST_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            self.log.warning("transfer_libraries_not_listed", binary=binary,
                             reason=f"the loader did not list them within {LIST_TIMEOUT:g} s")
            return
        if proc.returncode != 0:
            self.log.warning("transfer_libraries_not_listed", binary=binary,
                             reason=f"the loader's trace exited {proc.returncode}")
            return
        found = parse_libraries(out.decode(errors="replace"))
        self.lists[binary] = (stamp, found)
        self.log.info("transfer_libraries_listed", binary=binary, count=len(found))
