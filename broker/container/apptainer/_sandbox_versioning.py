"""Timestamped sandbox directories: list, switch, roll back, clean up.

Layout: ``sandbox-YYYYMMDD_HHMMSS/`` directories next to a ``current-sandbox`` symlink.
Same rules as SIF versioning (mtime newest first, version tie-break, atomic link swap),
but a missing directory lists as ``[]`` and cleans up nothing (B24).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .._files import format_date, newest_first
from ._links import switch_link
from ._versioning import beyond_keep, previous_version

__all__ = [
    "SANDBOX_RE",
    "CURRENT_SANDBOX_LINK",
    "list_sandboxes",
    "get_active_sandbox",
    "switch_sandbox",
    "rollback_sandbox",
    "cleanup_sandboxes",
]

SANDBOX_RE = re.compile(r"^sandbox-(\d{8}_\d{6})$")
CURRENT_SANDBOX_LINK = "current-sandbox"


def _sandboxes(directory: Path) -> list[tuple[str, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = SANDBOX_RE.fullmatch(path.name)
        if match and path.is_dir():
            found.append((match.group(1), path))
    return newest_first(found, lambda item: item[1].stat().st_mtime, lambda item: item[0])


def get_active_sandbox(containers_dir: str | Path) -> str | None:
    """Timestamp in the raw target of ``current-sandbox``; ``None`` if not a symlink."""
    link = Path(containers_dir) / CURRENT_SANDBOX_LINK
    if not link.is_symlink():
        return None
    match = SANDBOX_RE.fullmatch(Path(os.readlink(link)).name)
    return match.group(1) if match else None


def list_sandboxes(containers_dir: str | Path) -> list[dict[str, object]]:
    """``[{version, path, date, active}]`` newest first; ``[]`` for a missing directory."""
    directory = Path(containers_dir)
    active = get_active_sandbox(directory)
    return [
        {
            "version": version,
            "path": str(directory / path.name),
            "date": format_date(path.stat().st_mtime),
            "active": version == active,
        }
        for version, path in _sandboxes(directory)
    ]


def switch_sandbox(version: str, containers_dir: str | Path, use_sudo: bool = False) -> None:
    """Atomically point ``current-sandbox`` at ``sandbox-{version}`` (relative link)."""
    directory = Path(containers_dir)
    if not re.fullmatch(r"\d{8}_\d{6}", str(version)):
        raise ValueError(f"version: must match YYYYMMDD_HHMMSS (got {version!r})")
    name = f"sandbox-{version}"
    if not (directory / name).is_dir():
        raise FileNotFoundError(f"Sandbox {version} not found: {directory / name}")
    switch_link(directory / CURRENT_SANDBOX_LINK, name, f"sandbox {version}", use_sudo=use_sudo)


def rollback_sandbox(containers_dir: str | Path, use_sudo: bool = False) -> str:
    """Switch to the next older sandbox (by mtime) than the active one and return it."""
    directory = Path(containers_dir)
    ordered = [version for version, _ in _sandboxes(directory)]
    previous = previous_version(get_active_sandbox(directory), ordered, "sandbox")
    switch_sandbox(previous, directory, use_sudo)
    return previous


def cleanup_sandboxes(containers_dir: str | Path, keep: int = 5) -> list[Path]:
    """Delete sandboxes beyond the ``keep`` newest non-active ones; never the active one.

    A symlink named like a sandbox is removed as a link (its target is left alone).
    """
    directory = Path(containers_dir)
    removed = beyond_keep(_sandboxes(directory), get_active_sandbox(directory), keep)
    for path in removed:
        if path.is_symlink():
            path.unlink()
        else:
            shutil.rmtree(path)
    return removed
