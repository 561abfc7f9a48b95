"""The one place where SLURM commands are run (anyio subprocesses, no pyslurm).

Commands for a user run *as* that user: uid, gid and supplementary groups are
dropped in the child before exec, the environment is rebuilt from scratch and the
working directory is the user's home, entered *as the user* (:func:`in_home`).
``srun --uid`` is never used (it is gone since SLURM 23.02.5 and would run the
client as root).

Every call is bounded by a timeout; a timeout counts as "controller unavailable",
because that is what a hung RPC means to the caller.
"""

from __future__ import annotations

import collections
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anyio
import anyio.abc

from .. import log as _log
from ..identity import User
from .errors import CommandFailed, ControllerUnavailable, NotFound
from .parse import classify_stderr


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


#: ``sh -c`` program that enters the home given as ``$1`` and execs the rest of argv.
#: ``$1``/``"$@"`` are arguments, never parsed as shell text; a home the user cannot
#: enter (gone, unmounted) leaves the command in ``/``, as before.
_IN_HOME = 'cd -- "$1" 2>/dev/null || cd /; shift; exec "$@"'


def in_home(home: str, argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped to start in ``home``, changing directory after the privilege drop.

    CPython's subprocess child calls ``chdir(cwd)`` *before* ``setgroups``/``setgid``/
    ``setuid``, i.e. as root: a root-squashed NFS home or a user's FUSE mount without
    ``allow_other`` refuses root, the spawn fails, and root would be traversing a path
    the user controls. So the process starts in ``/`` and this wrapper, already running
    as the user, enters the home with the user's own rights.
    """
    return ["/bin/sh", "-c", _IN_HOME, "sbroker-in-home", home, *argv]


def user_env(user: User | None, *, path: str, slurm_conf: str = "",
             extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for a process run on behalf of ``user``.

    Nothing leaks from the broker's own environment: a user's job must never see
    the daemon's variables, and the daemon must not depend on how it was started.
    """
    env = {"PATH": path, "LANG": "C.UTF-8"}
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf
    if user is not None:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name, SHELL=user.shell or "/bin/sh")
    if extra:
        env.update(extra)
    return env


class Runner:
    """Runs SLURM commands with bounded time, typed errors and a call counter."""

    def __init__(self, *, path: str, slurm_conf: str = "", timeout: float = 30.0) -> None:
        self.path = path
        self.slurm_conf = slurm_conf
        self.timeout = timeout
        #: Calls per command name, for metrics and the scheduler-load benchmark.
        self.calls: collections.Counter[str] = collections.Counter()

    def env(self, user: User | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return user_env(user, path=self.path, slurm_conf=self.slurm_conf, extra=extra)

    async def run(self, argv: Sequence[str], *, user: User | None = None, input: bytes | None = None,
                  timeout: float | None = None, check: bool = True) -> Result:
        """Run ``argv`` (as ``user`` if given) and return its output.

        Raises :class:`NotFound`, :class:`ControllerUnavailable` or
        :class:`CommandFailed` when ``check`` is true and the command fails.
        """
        argv = [str(a) for a in argv]
        self.calls[os.path.basename(argv[0])] += 1
        limit = timeout or self.timeout
        kwargs: dict = {}
        if user is not None and os.geteuid() == 0 and user.uid != 0:
            kwargs = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
        started = time.monotonic()
        try:
            with anyio.fail_after(limit):
                proc = await anyio.run_process(
                    in_home(user.home, argv) if user is not None else argv, input=input, check=False,
                    env=self.env(user), cwd="/",
                    stdin=None if input is not None else subprocess.DEVNULL, **kwargs)
        except TimeoutError:
            raise ControllerUnavailable(argv, None, "", f"{argv[0]} timed out after {limit:g}s") from None
        except OSError as exc:
            raise CommandFailed(argv, None, str(exc), f"{argv[0]} could not be started: {exc}") from None
        result = Result(argv, proc.returncode, proc.stdout.decode(errors="replace"),
                        proc.stderr.decode(errors="replace"), time.monotonic() - started)
        _log.get("sbroker.slurm").debug("slurm_call", argv=argv[:2], user=user.name if user else "root",
                                        rc=result.returncode, seconds=round(result.seconds, 4))
        if check and result.returncode != 0:
            raise_for(result)
        return result


    async def detach(self, argv: Sequence[str], *, user: User | None, stdin_path: str, output_path: str,
                     extra_env: Mapping[str, str] | None = None, timeout: float | None = None) -> Result:
        """Start a process that outlives the broker (``setsid --fork`` or ``systemd-run``: the
        argv itself detaches, and this returns when its launcher has).

        ``stdin_path`` is the broker's own root-only file, opened here by root and handed over
        as a descriptor: the user's process never gets a path to it, and root never opens a
        path the user controls. ``output_path`` is ``/dev/null`` for a process the user owns:
        a root file it could write without bound would let it fill root's state directory."""
        argv = [str(a) for a in argv]
        self.calls[os.path.basename(argv[0])] += 1
        kwargs: dict = {}
        if user is not None and os.geteuid() == 0 and user.uid != 0:
            kwargs = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
        limit = timeout or self.timeout
        started = time.monotonic()
        stdin = os.open(stdin_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            out = os.open(output_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            os.close(stdin)
            raise
        try:
            with anyio.fail_after(limit):
                proc = await anyio.run_process(
                    in_home(user.home, argv) if user is not None else argv, check=False, stdin=stdin,
                    stdout=out, stderr=out, env=self.env(user, extra_env), cwd="/", **kwargs)
        except TimeoutError:
            raise ControllerUnavailable(argv, None, "", f"{argv[0]} timed out after {limit:g}s") from None
        except OSError as exc:
            raise CommandFailed(argv, None, str(exc), f"{argv[0]} could not be started: {exc}") from None
        finally:
            os.close(stdin)
            os.close(out)
        result = Result(argv, proc.returncode, "", "", time.monotonic() - started)
        _log.get("sbroker.slurm").debug("slurm_detach", argv=argv[:3], user=user.name if user else "root",
                                        rc=result.returncode, seconds=round(result.seconds, 4))
        if result.returncode != 0:
            raise CommandFailed(argv, result.returncode, "", f"{argv[0]}: exit status {result.returncode}")
        return result

    async def spawn_pty(self, argv: Sequence[str], *, user: User, tty_fd: int,
                        extra_env: Mapping[str, str] | None = None) -> anyio.abc.Process:
        """Start ``argv`` as ``user`` with ``tty_fd`` as its controlling terminal.

        ``setsid --ctty`` (util-linux) makes the child a session leader that owns the
        pty, so ``srun --pty`` reads the window size from it and receives SIGWINCH.
        It starts in ``/`` and enters the home as the user (:func:`in_home`).
        """
        argv = [str(a) for a in argv]
        self.calls[os.path.basename(argv[0])] += 1
        kwargs: dict = {}
        if os.geteuid() == 0 and user.uid != 0:
            kwargs = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
        return await anyio.open_process(["setsid", "--ctty", *in_home(user.home, argv)], stdin=tty_fd,
                                        stdout=tty_fd, stderr=tty_fd, env=self.env(user, extra_env), cwd="/",
                                        **kwargs)


def raise_for(result: Result) -> None:
    """Turn a failed :class:`Result` into the matching typed error."""
    stderr = result.stderr.strip()
    last = stderr.splitlines()[-1] if stderr else f"exit status {result.returncode}"
    kind = classify_stderr(stderr)
    cls = {"controller": ControllerUnavailable, "not_found": NotFound}.get(kind, CommandFailed)
    raise cls(result.argv, result.returncode, stderr, f"{result.argv[0]}: {last}")
