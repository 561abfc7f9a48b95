"""Locating the container runtime and the containers directory — pure lookups.

Why: upstream's lookup created files under the user's state dir as a side effect (B25)
and computed its package-relative candidate one directory too high (B14).  Here lookups
only read the filesystem.  Run as root, the lookup never looks in the current directory
and takes only admin-owned directories (:mod:`.._trust`): a recipe's ``%setup`` runs on
the host as root, so a ``containers/`` planted in ``/tmp`` must not be found.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .._proc import MissingToolError
from .._trust import UntrustedPathError, as_root, require_admin_owned

log = logging.getLogger("broker.container")

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

    1. ``<cwd>/containers`` — not as root
    2. the source checkout's own ``containers/`` (next to the ``broker`` package)
    3. ``$SCITEX_DIR/containers`` (default ``~/.scitex/containers``)

    As root a candidate must also be admin-owned; one that has recipes but is not is
    skipped with a warning. Pass the directory explicitly (``--dir``, ``def_path``) to
    use any other.
    """
    user_root = Path(os.environ.get("SCITEX_DIR") or Path.home() / ".scitex")
    root = as_root()
    candidates = [repo_containers_dir(), user_root / "containers"]
    if not root:
        candidates.insert(0, Path.cwd() / "containers")
    refused = []
    for candidate in candidates:
        if not _has_recipes(candidate):
            continue
        try:
            return require_admin_owned(candidate, "containers dir")
        except UntrustedPathError as exc:
            log.warning("skipping %s", exc)
            refused.append(str(candidate))
    searched = ", ".join(str(c) for c in candidates)
    skipped = f"; not admin-owned, so skipped as root: {', '.join(refused)}" if refused else ""
    raise FileNotFoundError(f"no containers directory with *.def recipes found (searched: {searched}{skipped})")


def is_sandbox(path: str | os.PathLike[str]) -> bool:
    """True unless the path (trailing ``/`` ignored) ends in ``.sif``. No filesystem access."""
    return not os.fspath(path).rstrip("/").endswith(".sif")
