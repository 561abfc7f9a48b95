"""Versioned SIF images in one directory: list, switch, roll back, deploy, clean up.

Layout: ``scitex-v<version>.sif`` files, optional ``scitex-base-v*.sif`` base images, and
a ``current.sif`` symlink naming the active version.  Ordering everywhere is mtime,
newest first, ties broken by version (natural order, highest first).

Fixes over upstream: unique temp link names + atomic rename (B11); a dangling
``current.sif`` means "no active version" (B29); ``cleanup_sifs`` keeps the active and
base images when ``keep > 0`` (B18); ``deploy`` copies to a temp name, preserves mtimes
and renames into place, with failures as :class:`RuntimeError` (B20, B22).
"""

from __future__ import annotations

import re
from pathlib import Path

from .._files import format_date, human_size, newest_first, temp_sibling
from .._proc import run, sudo_prefix
from ._links import switch_link

__all__ = [
    "VERSIONED_SIF_RE",
    "CURRENT_LINK",
    "list_versions",
    "get_active_version",
    "switch_version",
    "rollback",
    "deploy",
    "cleanup",
    "cleanup_sifs",
    "versioned_sifs",
    "base_sifs",
    "beyond_keep",
    "previous_version",
]

VERSIONED_SIF_RE = re.compile(r"^scitex-v(.+)\.sif$")
CURRENT_LINK = "current.sif"
BASE_GLOB = "scitex-base-v*.sif"


def _sif_name(version: str) -> str:
    name = f"scitex-v{version}.sif"
    if "/" in version or "\0" in version or not version or not VERSIONED_SIF_RE.fullmatch(name):
        raise ValueError(f"version: must be a non-empty string without '/' (got {version!r})")
    return name


def versioned_sifs(containers_dir: Path) -> list[tuple[str, Path]]:
    """``(version, path)`` of every versioned SIF file, newest first."""
    found = []
    for path in containers_dir.glob("scitex-v*.sif"):
        match = VERSIONED_SIF_RE.fullmatch(path.name)
        if match and path.is_file():
            found.append((match.group(1), path))
    return newest_first(found, lambda item: item[1].stat().st_mtime, lambda item: item[0])


def base_sifs(containers_dir: Path) -> list[Path]:
    """Base images (``scitex-base-v*.sif``), newest first."""
    bases = [p for p in containers_dir.glob(BASE_GLOB) if p.is_file()]
    return newest_first(bases, lambda p: p.stat().st_mtime, lambda p: p.name)


def get_active_version(containers_dir: str | Path) -> str | None:
    """Version named by the file ``current.sif`` resolves to; ``None`` if absent or dangling."""
    link = Path(containers_dir) / CURRENT_LINK
    if not link.is_symlink():
        return None
    target = link.resolve()
    if not target.is_file():
        return None
    match = VERSIONED_SIF_RE.fullmatch(target.name)
    return match.group(1) if match else None


def list_versions(containers_dir: str | Path) -> list[dict[str, object]]:
    """``[{version, path, size, date, active}]`` newest first; ``[]`` for a missing directory."""
    directory = Path(containers_dir)
    active = get_active_version(directory)
    result = []
    for version, path in versioned_sifs(directory):
        stat = path.stat()
        result.append(
            {
                "version": version,
                "path": str(directory / path.name),
                "size": human_size(stat.st_size),
                "date": format_date(stat.st_mtime),
                "active": version == active,
            }
        )
    return result


def switch_version(version: str, containers_dir: str | Path, use_sudo: bool = False) -> None:
    """Atomically point ``current.sif`` at ``scitex-v{version}.sif`` (relative link).

    Raises :class:`FileNotFoundError` if that file does not exist and
    :class:`RuntimeError` if the link cannot be replaced.
    """
    directory = Path(containers_dir)
    name = _sif_name(version)
    if not (directory / name).exists():
        raise FileNotFoundError(f"Version {version} not found: {directory / name}")
    switch_link(directory / CURRENT_LINK, name, f"version {version}", use_sudo=use_sudo)


def previous_version(active: str | None, ordered: list[str], what: str) -> str:
    if active is None:
        raise RuntimeError(f"No active {what}: nothing to roll back from")
    if active not in ordered:
        raise RuntimeError(f"Active {what} {active} not found in directory")
    at = ordered.index(active)
    if at == len(ordered) - 1:
        raise RuntimeError(f"No older {what} available before {active}")
    return ordered[at + 1]


def rollback(containers_dir: str | Path, use_sudo: bool = False) -> str:
    """Switch to the next older version (by mtime) than the active one and return it."""
    directory = Path(containers_dir)
    ordered = [version for version, _ in versioned_sifs(directory)]
    previous = previous_version(get_active_version(directory), ordered, "version")
    switch_version(previous, directory, use_sudo)
    return previous


def _sudo_copy(source: Path, destination: Path, sudo: list[str]) -> None:
    tmp = temp_sibling(destination)
    run([*sudo, "cp", "--preserve=timestamps", str(source), str(tmp)])
    try:
        run([*sudo, "mv", "-f", str(tmp), str(destination)])
    except RuntimeError:
        run([*sudo, "rm", "-f", str(tmp)], check=False)
        raise


def deploy(source_dir: str | Path, target_dir: str | Path = Path("/opt/scitex/singularity")) -> None:
    """Copy the active SIF and newest base SIF to ``target_dir`` and point ``current.sif`` there.

    Copies use sudo (skipped when already root), go to a temp name first and keep mtimes,
    so running containers never see a half-written file and rollback order is preserved.
    """
    source = Path(source_dir)
    target = Path(target_dir)
    active = get_active_version(source)
    if active is None:
        raise RuntimeError(f"No active version in source directory {source}")
    active_sif = source / _sif_name(active)
    if not active_sif.is_file():
        raise FileNotFoundError(f"Active SIF not found: {active_sif}")
    sudo = sudo_prefix(True)
    run([*sudo, "mkdir", "-p", str(target)])
    _sudo_copy(active_sif, target / active_sif.name, sudo)
    bases = base_sifs(source)
    if bases:
        _sudo_copy(bases[0], target / bases[0].name, sudo)
    switch_version(active, target, use_sudo=True)


def cleanup(containers_dir: str | Path, keep: int = 3) -> list[Path]:
    """Delete versioned SIFs beyond the ``keep`` newest non-active ones.

    Never deletes the active version or base images; returns removed paths, newest first.
    """
    directory = Path(containers_dir)
    removed = beyond_keep(versioned_sifs(directory), get_active_version(directory), keep)
    for path in removed:
        path.unlink()
    return removed


def beyond_keep(ordered: list[tuple[str, Path]], active: str | None, keep: int) -> list[Path]:
    """Paths past the ``keep`` newest non-active entries of a newest-first list."""
    others = [path for version, path in ordered if version != active]
    return others[max(keep, 0) :]


def cleanup_sifs(containers_dir: str | Path, keep: int = 0) -> list[Path]:
    """Remove ``*.sif.old``, ``*.sif.backup.*``, old SIFs and (with ``keep=0``) everything.

    ``keep=0`` is a full purge: every ``*.sif`` including base images and ``current.sif``.
    ``keep>0`` keeps the ``keep`` newest versioned SIFs *counting the active one* (which
    is never deleted), keeps base images, and keeps ``current.sif`` while its target exists;
    other non-versioned ``*.sif`` files are removed in both modes.
    """
    directory = Path(containers_dir)
    removed: list[Path] = []

    def remove(path: Path) -> None:
        path.unlink()
        removed.append(path)

    for pattern in ("*.sif.old", "*.sif.backup.*"):
        for path in sorted(directory.glob(pattern)):
            if path.is_file() or path.is_symlink():
                remove(path)

    active = get_active_version(directory) if keep > 0 else None
    ordered = versioned_sifs(directory)
    survivors = {version for version, _ in ordered if version == active}
    for version, _ in ordered:
        if len(survivors) >= max(keep, 0):
            break
        survivors.add(version)
    for version, path in ordered:
        if version not in survivors:
            remove(path)

    for path in sorted(directory.glob("*.sif")):
        if path.name == CURRENT_LINK or VERSIONED_SIF_RE.fullmatch(path.name) or not path.is_file():
            continue
        if keep > 0 and path.match(BASE_GLOB):
            continue  # later images are built "From:" a base image
        remove(path)
    link = directory / CURRENT_LINK
    if link.is_symlink() and (keep <= 0 or not link.exists()):
        remove(link)
    return removed
