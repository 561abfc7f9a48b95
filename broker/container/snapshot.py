"""``env_snapshot()``: a JSON-serialisable record of which image, host tools and dev repos
a session ran with — for reproducibility reports.

Why it never raises: it is called on the way into a session; a missing git or an odd
containers dir must degrade to missing fields, not block the user.  It only reads
(B25).  Lock files are looked up under the names ``freeze`` writes (hyphenated) first,
then the legacy underscore/``.lock`` names (B15).
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any, Sequence

from ._files import sha256_file
from .apptainer._integrity import DEF_HASH_FILE, read_stored_hash
from .apptainer._runtime import find_containers_dir
from .apptainer._versioning import CURRENT_LINK, get_active_version

__all__ = ["SCHEMA_VERSION", "LOCK_NAMES", "env_snapshot"]

log = logging.getLogger("broker.container")

SCHEMA_VERSION = "1.0"
LOCK_NAMES = {
    "pip": ("requirements-lock.txt", "requirements_lock.txt", "requirements.lock"),
    "dpkg": ("dpkg-lock.txt", "dpkg_lock.txt", "dpkg.lock"),
}


def _safe_sha(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError:
        return ""


def _container_info(directory: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"version": get_active_version(directory)}
    link = directory / CURRENT_LINK
    if link.is_symlink():
        sif = link.resolve()
        info["sif_path"] = str(sif)
        if sif.is_file():
            info["sif_sha256"] = _safe_sha(sif)
            for hash_file in (sif.parent / DEF_HASH_FILE, sif.with_suffix(".def-hash")):
                stored = read_stored_hash(hash_file)
                if stored:
                    info["def_hash"] = stored
                    break
    elif link.is_file():
        info["sif_path"] = str(link)
        info["sif_sha256"] = _safe_sha(link)
    return info


def _host_info() -> dict[str, Any]:
    from .host import check_packages

    return {group: {"installed": v["installed"], "version": v["version"]} for group, v in check_packages().items()}


def _git(path: Path, *args: str) -> str:
    try:
        proc = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _repo_info(repo: str | Path) -> dict[str, Any]:
    path = Path(repo).expanduser()
    entry: dict[str, Any] = {"name": path.name, "path": str(path.resolve())}
    if not path.exists():
        entry["error"] = "path does not exist"
    elif shutil.which("git") is None:
        entry["error"] = "git not found"
    else:
        commit, branch = _git(path, "rev-parse", "HEAD"), _git(path, "branch", "--show-current")
        if commit:
            entry["commit"] = commit
        if branch:
            entry["branch"] = branch
        entry["dirty"] = bool(_git(path, "status", "--porcelain"))
    return entry


def _lock_hashes(directories: Sequence[Path]) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for key, names in LOCK_NAMES.items():
        for directory in directories:
            found = next((directory / n for n in names if (directory / n).is_file()), None)
            if found is not None:
                hashes[key] = _safe_sha(found)
                break
    return hashes


def env_snapshot(
    containers_dir: str | Path | None = None, dev_repos: Sequence[str | Path] | None = None
) -> dict[str, Any]:
    """``{schema_version, timestamp, container, host, dev_repos, lock_files}``; never raises.

    Lock files are searched in the active SIF's directory, then the containers dir.
    """
    snapshot: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "container": {},
        "host": {},
        "dev_repos": [],
        "lock_files": {},
    }
    directory: Path | None = None
    try:
        directory = Path(containers_dir) if containers_dir else find_containers_dir()
        snapshot["container"] = _container_info(directory)
    except Exception as exc:  # degrade, never raise
        log.debug("env_snapshot: container info unavailable: %s", exc)
    try:
        snapshot["host"] = _host_info()
    except Exception as exc:
        log.debug("env_snapshot: host info unavailable: %s", exc)
    for repo in dev_repos or ():
        try:
            snapshot["dev_repos"].append(_repo_info(repo))
        except Exception as exc:
            snapshot["dev_repos"].append({"name": str(repo), "error": str(exc)})
    if directory is not None:
        try:
            sif_path = snapshot["container"].get("sif_path")
            dirs = ([Path(sif_path).parent] if sif_path else []) + [directory]
            snapshot["lock_files"] = _lock_hashes(dirs)
        except Exception as exc:
            log.debug("env_snapshot: lock files unavailable: %s", exc)
    return snapshot
