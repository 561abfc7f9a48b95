"""Which paths root may act on: admin-owned ones only.

Why: the toolkit runs as root (``sbroker image build``), and a recipe's ``%setup``
runs on the host as root. A recipe, containers dir or output dir that anyone but root
can write is a root shell for whoever can write it (upstream even searched the
current directory first, so a ``containers/`` planted in ``/tmp`` was enough).

The rule, OpenSSH ``StrictModes``-style, applied only when the effective uid is 0
(an ordinary user acting on their own files needs no protection from themselves):
every component of the path as given *and* of its resolved form must be owned by
root (a symlink too: whoever owns it can point it elsewhere), the path itself must
not be group- or world-writable, and an ancestor may be writable by others only if
it is sticky (``/tmp``: nobody can rename or replace root's entry in it). A path that
does not exist yet (an output dir to be made) is judged by its deepest existing
directory, which root will create it in.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["UntrustedPathError", "as_root", "require_admin_owned"]


class UntrustedPathError(PermissionError):
    """Root was asked to use a path someone other than root can change."""


def as_root() -> bool:
    return os.geteuid() == 0


def _problem(path: Path, *, last: bool) -> str | None:
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot be checked ({exc.strerror})"
    if st.st_uid != 0:
        return f"is owned by uid {st.st_uid}, not root"
    if stat.S_ISLNK(st.st_mode):
        return None  # a link's own mode means nothing; its target is checked in the resolved chain
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and (last or not st.st_mode & stat.S_ISVTX):
        return f"is {'group' if writable & stat.S_IWGRP else 'world'}-writable (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def require_admin_owned(path: str | os.PathLike[str], what: str) -> Path:
    """Return ``path`` unchanged, or raise :class:`UntrustedPathError` when root may not use it.

    ``what`` names the path in the one-line error (``"containers dir"``, ``"recipe"``).
    A no-op unless running as root.
    """
    path = Path(path)
    if not as_root():
        return path
    given = Path(os.path.abspath(path))
    for full in (given, Path(os.path.realpath(given))):
        chain = [c for c in (*reversed(full.parents), full) if os.path.lexists(c)]
        for i, component in enumerate(chain):
            problem = _problem(component, last=i == len(chain) - 1)
            if problem:
                where = "" if component == given else f": {component}"
                raise UntrustedPathError(f"{what} {path}{where} {problem}; as root only admin-owned paths "
                                         f"(owned by root, not group/world-writable) are used")
    return path
