"""Atomic replacement of the ``current.sif`` / ``current-sandbox`` links.

Why: a reader (a session starting right now) must see either the old or the new image,
never a missing link.  A new symlink is created under a unique temporary name in the
same directory (pid + random suffix, B11) and renamed over the old one.  Without sudo
this is ``os.symlink`` + ``os.replace``; with sudo it is ``sudo ln -sfn`` +
``sudo mv -Tf`` and the temp link is cleaned up with sudo too.
"""

from __future__ import annotations

import os
from pathlib import Path

from .._files import temp_sibling
from .._proc import run, sudo_prefix

__all__ = ["replace_symlink", "switch_link"]


def replace_symlink(link: Path, target: str, *, use_sudo: bool = False) -> None:
    """Point ``link`` at ``target`` (stored verbatim, usually relative) atomically.

    Raises :class:`RuntimeError` (with the command or OS error) on any failure.
    """
    tmp = temp_sibling(link)
    sudo = sudo_prefix(use_sudo)
    if not sudo:
        try:
            os.symlink(target, tmp)
            os.replace(tmp, link)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise RuntimeError(f"could not point {link} at {target}: {exc}") from exc
        return
    run([*sudo, "ln", "-sfn", target, str(tmp)])
    try:
        run([*sudo, "mv", "-Tf", str(tmp), str(link)])
    except RuntimeError:
        run([*sudo, "rm", "-f", str(tmp)], check=False)
        raise


def switch_link(link: Path, target: str, what: str, *, use_sudo: bool) -> None:
    """Point ``link`` at ``target``, or raise ``RuntimeError("Failed to switch to <what>: …")``."""
    try:
        replace_symlink(link, target, use_sudo=use_sudo)
    except RuntimeError as exc:
        raise RuntimeError(f"Failed to switch to {what}: {exc}") from exc
