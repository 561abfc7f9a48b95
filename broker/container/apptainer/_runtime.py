"""Locating the container runtime and the containers directory — pure lookups.

Why: upstream's lookup created files under the user's state dir as a side effect (B25)
and computed its package-relative candidate one directory too high (B14).  Here lookups
only read the filesystem.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .._proc import MissingToolError

__all__ = ["detect_container_cmd", "find_containers_dir", "is_sandbox", "repo_containers_dir"]

#: ``<repo>/containers`` in a source checkout: broker/container/apptainer/_runtime.py → parents[3].
def repo_containers_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "containers"


def detect_container_cmd() -> str:
    """Return ``'apptainer'`` or ``'singularity'`` (bare name), preferring apptainer.

    Raises :class:`MissingToolError` (a :class:`FileNotFoundError`) if neither exists.
    """
    for name in ("apptainer", "singularity"):
        if shutil.which(name):
            return name
    raise MissingToolError(
        "neither apptainer nor singularity found on PATH; install apptainer "
        "(https://apptainer.org/docs/admin/main/installation.html)"
    )


def _has_recipes(candidate: Path) -> bool:
    return candidate.is_dir() and any(p.is_file() for p in candidate.glob("*.def"))


def find_containers_dir() -> Path:
    """Find the directory holding ``.def`` recipes.

    Search order (a candidate must be a directory with at least one ``*.def``):

    1. ``<cwd>/containers``
    2. the source checkout's own ``containers/`` (next to the ``broker`` package)
    3. ``$SCITEX_DIR/containers`` (default ``~/.scitex/containers``)
    """
    user_root = Path(os.environ.get("SCITEX_DIR") or Path.home() / ".scitex")
    candidates = [Path.cwd() / "containers", repo_containers_dir(), user_root / "containers"]
    for candidate in candidates:
        if _has_recipes(candidate):
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no containers directory with *.def recipes found (searched: {searched})")


def is_sandbox(path: str | os.PathLike[str]) -> bool:
    """True unless the path (trailing ``/`` ignored) ends in ``.sif``. No filesystem access."""
    return not os.fspath(path).rstrip("/").endswith(".sif")
