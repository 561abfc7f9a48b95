"""Writable sandbox directories: create, set the prompt, maintain, update, convert to SIF.

Why separate from versioning: these functions run apptainer on a sandbox's contents;
versioning only moves links.  Fixes over upstream: ``current-sandbox`` always resolves
to the created directory (B10); ``sandbox_configure_ps1`` honours ``default_ps1`` and
edits line-wise, atomically (B19); mount points are created below the sandbox root only
when missing (B23); ``sandbox_to_sif`` builds to a temp name and renames (B20).
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Iterable, Sequence

from .._files import atomic_write_text, temp_sibling
from .._proc import run, sudo_prefix
from .._validate import validate_name
from ._links import replace_symlink
from ._runtime import detect_container_cmd
from ._sandbox_versioning import CURRENT_SANDBOX_LINK

__all__ = [
    "DEFAULT_PS1",
    "PS1_ENV_VAR",
    "ECOSYSTEM_PACKAGES",
    "sandbox_create",
    "sandbox_configure_ps1",
    "sandbox_maintain",
    "sandbox_update",
    "sandbox_to_sif",
    "ps1_line",
]

log = logging.getLogger("broker.container")

DEFAULT_PS1 = "\\W $ "
PS1_ENV_VAR = "SCITEX_CLOUD_APPTAINER_PS1"
ENV_SCRIPT = Path(".singularity.d/env/90-environment.sh")
ECOSYSTEM_PACKAGES = (
    "scitex",
    "figrecipe",
    "scitex-writer",
    "scitex-dataset",
    "crossref-local",
    "openalex-local",
    "socialia",
    "scitex-linter",
    "scitex-container",
)
_PS1_LINE_RE = re.compile(r"^\s*export PS1=")


def _require_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")


def sandbox_create(
    source: str | os.PathLike[str],
    containers_dir: str | os.PathLike[str] | None = None,
    *,
    output_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Build ``sandbox-YYYYMMDD_HHMMSS/`` (or ``output_dir``) from a SIF or .def and activate it.

    ``current-sandbox`` in the parent dir is pointed at the new sandbox with a path relative
    to that dir, so it resolves even when ``output_dir`` lives elsewhere.
    """
    source_path = Path(source)
    _require_exists(source_path, "Source")
    parent = Path(containers_dir) if containers_dir else source_path.parent
    sandbox_dir = Path(output_dir) if output_dir else parent / f"sandbox-{time.strftime('%Y%m%d_%H%M%S')}"
    if sandbox_dir.exists():
        raise FileExistsError(f"Sandbox already exists: {sandbox_dir}")
    cmd = detect_container_cmd()
    proc = run([cmd, "build", "--sandbox", "--fakeroot", str(sandbox_dir), str(source_path)], capture=False, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"Sandbox creation failed with exit code {proc.returncode}")
    parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(sandbox_dir.absolute(), parent.absolute())
    replace_symlink(parent / CURRENT_SANDBOX_LINK, target)
    sandbox_configure_ps1(sandbox_dir)
    return sandbox_dir


def _double_quote_escape(text: str) -> str:
    return re.sub(r'([\\"$`])', r"\\\1", text)


def ps1_line(default_ps1: str = DEFAULT_PS1) -> str:
    """``export PS1="${SCITEX_CLOUD_APPTAINER_PS1:-<default>}"`` with the default escaped."""
    if "\n" in default_ps1 or "\0" in default_ps1:
        raise ValueError(f"default_ps1: must not contain newline or NUL (got {default_ps1!r})")
    return f'export PS1="${{{PS1_ENV_VAR}:-{_double_quote_escape(default_ps1)}}}"'


def sandbox_configure_ps1(sandbox_dir: str | os.PathLike[str], default_ps1: str = DEFAULT_PS1) -> None:
    """Make the sandbox's ``%environment`` export PS1 from ``$SCITEX_CLOUD_APPTAINER_PS1``.

    Falls back to ``default_ps1``.  Every ``export PS1=`` line is replaced; if none exists
    the line is appended.  Apptainer's own default prompt only applies when PS1 is unset,
    and ``90-environment.sh`` runs before it.  A missing env script is logged and skipped.
    """
    env_file = Path(sandbox_dir) / ENV_SCRIPT
    if not env_file.is_file():
        log.warning("no %s in sandbox %s; prompt not configured", ENV_SCRIPT, sandbox_dir)
        return
    line = ps1_line(default_ps1)
    lines = env_file.read_text(encoding="utf-8").splitlines()
    replaced = [line if _PS1_LINE_RE.match(old) else old for old in lines]
    if not any(_PS1_LINE_RE.match(old) for old in lines):
        replaced += ["", line]
    atomic_write_text(env_file, "\n".join(replaced) + "\n", mode=env_file.stat().st_mode & 0o7777)


def sandbox_maintain(sandbox_dir: str | os.PathLike[str], command: Sequence[str]) -> int:
    """Run ``command`` in the sandbox with ``--writable --fakeroot`` (admin use); return its code."""
    sandbox = Path(sandbox_dir)
    _require_exists(sandbox, "Sandbox")
    if isinstance(command, str) or not command:
        raise ValueError(f"command: must be a non-empty list of strings (got {command!r})")
    cmd = detect_container_cmd()
    proc = run([cmd, "exec", "--writable", "--fakeroot", str(sandbox), *command], capture=False, check=False)
    if proc.returncode != 0:
        log.warning("command %s in %s exited with %d", list(command), sandbox, proc.returncode)
    return proc.returncode


def _package_dir(proj_root: Path, package: str) -> Path | None:
    candidates: Iterable[str] = ("scitex-python", "scitex-code") if package == "scitex" else (package,)
    for name in candidates:
        if (proj_root / name).is_dir():
            return proj_root / name
    return None


def sandbox_update(
    sandbox_dir: str | os.PathLike[str],
    *,
    proj_root: str | os.PathLike[str] | None = None,
    packages: Sequence[str] | None = None,
    install_deps: bool = False,
) -> dict[str, str]:
    """``pip install [--no-deps]`` local package checkouts into the sandbox.

    ``proj_root`` (default ``~/proj``) is bound at the same path; package ``scitex`` lives
    in ``scitex-python`` (or ``scitex-code``).  Returns ``{package: ok|failed|skipped}``.
    """
    sandbox = Path(sandbox_dir)
    _require_exists(sandbox, "Sandbox")
    root = Path(proj_root) if proj_root is not None else Path.home() / "proj"
    names = [validate_name(p, "packages[]") for p in (packages if packages is not None else ECOSYSTEM_PACKAGES)]
    cmd = detect_container_cmd()
    mount_point = sandbox.resolve() / str(root.absolute()).lstrip("/")
    if not mount_point.is_dir():
        mount_point.mkdir(parents=True, exist_ok=True)
    results: dict[str, str] = {}
    for name in names:
        package_dir = _package_dir(root, name)
        if package_dir is None:
            results[name] = "skipped"
            continue
        argv = [cmd, "exec", "--writable", "--fakeroot", "--bind", f"{root}:{root}", str(sandbox), "pip", "install"]
        argv += [] if install_deps else ["--no-deps"]
        proc = run([*argv, str(package_dir)], check=False)
        results[name] = "ok" if proc.returncode == 0 else "failed"
        if proc.returncode != 0:
            log.warning("pip install %s failed: %s", name, (proc.stderr or "")[-200:])
    return results


def sandbox_to_sif(sandbox_dir: str | os.PathLike[str], output_sif: str | os.PathLike[str]) -> Path:
    """Build a SIF from a sandbox (with sudo unless root) into a temp name, then rename."""
    sandbox = Path(sandbox_dir)
    _require_exists(sandbox, "Sandbox")
    output = Path(output_sif)
    cmd = detect_container_cmd()
    sudo = sudo_prefix(True)
    tmp = temp_sibling(output)
    proc = run([*sudo, cmd, "build", "--force", str(tmp), str(sandbox)], capture=False, check=False)
    if proc.returncode != 0:
        run([*sudo, "rm", "-f", str(tmp)], check=False)
        raise RuntimeError(f"SIF build from sandbox failed with exit code {proc.returncode}")
    try:
        os.replace(tmp, output)
    except OSError:
        run([*sudo, "mv", "-f", str(tmp), str(output)])
    return output
