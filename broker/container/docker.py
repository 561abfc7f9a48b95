"""Docker Compose helpers: rebuild, restart, status, and dev-repo volume strings.

Why it is small: the broker itself runs Apptainer; these exist for the development
stack.  Compose file discovery (B28): with ``project_dir`` only that directory is
searched (an explicit directory without a compose file is an error, not a silent
fallback); without it, the cwd and each ancestor up to ``/``.  In each directory the
names tried, in order, are :data:`compose_candidates` — ``docker-compose.<env>.yml``,
``docker-compose.<env>.yaml``, ``compose.<env>.yml``, ``compose.<env>.yaml``,
``docker-compose.yml``, ``docker-compose.yaml``, ``compose.yml``, ``compose.yaml``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from ._proc import require_tool, run
from ._validate import validate_mount_mode, validate_name, validate_path

__all__ = ["compose_candidates", "find_compose_file", "rebuild", "restart", "status", "get_dev_mounts"]


def compose_candidates(env: str) -> list[str]:
    """File names tried in each directory, most specific first."""
    env = validate_name(env, "env")
    specific = [f"{stem}.{env}.{ext}" for stem in ("docker-compose", "compose") for ext in ("yml", "yaml")]
    generic = [f"{stem}.{ext}" for stem in ("docker-compose", "compose") for ext in ("yml", "yaml")]
    return specific + generic


def find_compose_file(env: str = "dev", project_dir: str | os.PathLike[str] | None = None) -> Path:
    """Absolute path of the compose file for ``env`` (see module docstring for the order)."""
    names = compose_candidates(env)
    if project_dir is not None:
        directories = [Path(project_dir).resolve()]
    else:
        cwd = Path.cwd().resolve()
        directories = [cwd, *cwd.parents]
    for directory in directories:
        for name in names:
            if (directory / name).is_file():
                return directory / name
    where = ", ".join(str(d) for d in directories)
    raise FileNotFoundError(f"no compose file ({', '.join(names)}) found in: {where}")


def _compose(compose_file: Path, *args: str, capture: bool = False):  # type: ignore[no-untyped-def]
    docker = require_tool("docker", "run docker compose")
    return run([docker, "compose", "-f", str(compose_file), *args], capture=capture, check=False, cwd=compose_file.parent)


def rebuild(env: str = "dev", project_dir: str | os.PathLike[str] | None = None) -> int:
    """``docker compose -f <file> build --no-cache``; return its exit code."""
    return _compose(find_compose_file(env, project_dir), "build", "--no-cache").returncode


def restart(env: str = "dev", project_dir: str | os.PathLike[str] | None = None) -> int:
    """``down`` then ``up -d``; return the failing ``down`` code or the ``up`` code."""
    compose_file = find_compose_file(env, project_dir)
    down = _compose(compose_file, "down").returncode
    if down != 0:
        return down
    return _compose(compose_file, "up", "-d").returncode


def _parse_ps(stdout: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(stdout)
        items = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        items = []
        for line in stdout.splitlines():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [
        {
            "name": item.get("Name") or item.get("name") or "",
            "state": item.get("State") or item.get("state") or "",
            "image": item.get("Image") or item.get("image") or "",
            "raw": item,
        }
        for item in items
        if isinstance(item, dict)
    ]


def status(env: str = "dev", project_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``docker compose ps --format json`` as ``{compose_file, containers, returncode}``."""
    compose_file = find_compose_file(env, project_dir)
    proc = _compose(compose_file, "ps", "--format", "json", capture=True)
    containers = _parse_ps(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else []
    return {"compose_file": str(compose_file), "containers": containers, "returncode": proc.returncode}


def get_dev_mounts(repos: Sequence[dict[str, Any]]) -> list[str]:
    """``host:container:mode`` volume strings for dev repos (mode defaults to ``ro``).

    Entries missing ``host`` or ``container`` are skipped.  Host paths are never
    normalised; a relative one gets a ``./`` prefix (``../x`` → ``./../x``) because Compose
    treats a bare ``foo`` as a *named volume*, not a bind mount (B12).  Paths with ``:``,
    ``,``, newlines or NUL, relative or ``..`` container paths, and modes other than
    ``ro``/``rw`` raise :class:`ValueError`.
    """
    mounts = []
    for i, repo in enumerate(repos):
        host = repo.get("host", "")
        container = repo.get("container", "")
        if not host or not container:
            continue
        host = validate_path(host, f"repos[{i}].host", absolute=False, allow_dotdot=True)
        container = validate_path(container, f"repos[{i}].container")
        mode = validate_mount_mode(repo.get("mode", "ro"), f"repos[{i}].mode")
        if not host.startswith(("/", "./", "~")):
            host = f"./{host}"
        mounts.append(f"{host}:{container}:{mode}")
    return mounts
