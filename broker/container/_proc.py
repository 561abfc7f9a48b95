"""The one place :mod:`broker.container` runs external programs.

Why: upstream let ``CalledProcessError`` and bare ``FileNotFoundError`` escape from
wherever a tool happened to be called, so callers could not tell "apptainer is not
installed" from "the build failed".  Here every failure becomes one of two errors:

* :class:`MissingToolError` — the program is not on ``PATH``.  It subclasses both
  :class:`FileNotFoundError` (what the reference promises for a missing runtime) and
  :class:`RuntimeError` (what it promises for failed operations), so either ``except``
  clause catches it.
* :class:`RuntimeError` carrying the command line and the tail of stderr.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

__all__ = ["MissingToolError", "require_tool", "run", "sudo_prefix", "format_cmd"]

log = logging.getLogger("broker.container")

_STDERR_TAIL = 2000


class MissingToolError(FileNotFoundError, RuntimeError):
    """A required external program (apptainer, docker, sudo, apt-get, …) is not installed."""


def require_tool(name: str, purpose: str = "") -> str:
    """Return the absolute path of ``name`` on PATH or raise :class:`MissingToolError`."""
    found = shutil.which(name)
    if found is None:
        why = f" (needed to {purpose})" if purpose else ""
        raise MissingToolError(f"{name} not found on PATH{why}")
    return found


def sudo_prefix(use_sudo: bool) -> list[str]:
    """``["sudo"]`` when privilege is wanted and we are not already root, else ``[]``."""
    if not use_sudo or os.geteuid() == 0:
        return []
    require_tool("sudo", "run privileged commands")
    return ["sudo"]


def format_cmd(argv: Sequence[str | os.PathLike[str]]) -> str:
    return shlex.join(os.fspath(a) for a in argv)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    capture: bool = True,
    timeout: float | None = None,
    cwd: str | Path | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (never through a shell) and wrap every failure mode.

    With ``capture`` stdout/stderr are returned as text; otherwise they are inherited
    unless explicit ``stdout``/``stderr`` file descriptors are given.
    """
    args = [os.fspath(a) for a in argv]
    log.debug("running %s", format_cmd(args))
    kwargs: dict[str, object] = {"cwd": cwd, "timeout": timeout, "text": True}
    if capture:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    else:
        kwargs.update(stdout=stdout, stderr=stderr)
    try:
        proc = subprocess.run(args, **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError as exc:
        if cwd is not None and not Path(cwd).is_dir():
            raise
        raise MissingToolError(f"{args[0]} not found on PATH (running {format_cmd(args)})") from exc
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"command timed out after {timeout}s: {format_cmd(args)}") from exc
    if check and proc.returncode != 0:
        tail = (proc.stderr or "").strip()[-_STDERR_TAIL:] if capture else ""
        detail = f": {tail}" if tail else ""
        raise RuntimeError(f"command failed with exit code {proc.returncode}: {format_cmd(args)}{detail}")
    return proc
