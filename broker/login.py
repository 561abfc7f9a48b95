"""``sbroker login``: sshd's ForceCommand. Find or create the session, then connect.

This runs on every SSH login, so it imports only the standard library,
:mod:`broker.protocol`, :mod:`broker.client` and :mod:`broker.srunexec`. Routing:

* no ``SSH_ORIGINAL_COMMAND`` → an interactive login shell: the broker returns the
  ``srun --overlap --pty ... agent.py attach`` argv that reaches the session's agent in
  the allocation (:mod:`broker.agentlaunch`), which holds the shell: a dropped
  connection, a broker restart or a login through another login node finds it again;
* a command (``ssh host cmd``, scp, sftp, rsync, editors' remote servers) → the
  broker returns the exact ``srun --overlap ... apptainer exec instance://...``
  argv and environment.

Either way this process runs that ``srun`` (:func:`broker.srunexec.run_command`): the
streams are the SSH channel itself, binary-safe, and the exit status is the shell's or
the command's. The broker carries no byte of it.

The project comes from ``SBROKER_PROJECT`` (``AcceptEnv``), or a leading
``@project`` word in the command, else the broker's default; the profile from
``SBROKER_PROFILE`` or ``@project:profile`` (``@:profile`` for the default project).

Where the broker is never comes from the environment: ``~/.pam_environment`` and
``~/.ssh/environment`` are the user's to write, and a socket of the user's choosing
could answer with ``exec /bin/bash`` on the login node. The socket is ``--socket PATH``
(given by ``session_scripts/sbroker-login``, a root-owned file) or the default, and the
process listening on it must be root (``SO_PEERCRED``).
"""

from __future__ import annotations

import os
import sys

from .client import BrokerError, Client
from .protocol import DEFAULT_SOCKET

if False:  # for type checkers only: typing costs every SSH login time
    from typing import TextIO

_SPIN = "|/-\\"


class Progress:
    """Waiting feedback: a spinner line on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""
        self.ticks = 0

    def __call__(self, event: dict[str, object]) -> None:
        state = event.get("state", "")
        if state == "failed":
            return  # the error reply that follows says it, in one line
        text = state
        if event.get("pending_reason") not in (None, "", "None") and state in ("pending", "submitted"):
            text += f" (reason: {event['pending_reason']}"
            if event.get("expected_start") not in (None, "", "N/A", "Unknown"):
                text += f", expected start {event['expected_start']}"
            if isinstance(event.get("queue_ahead"), int):
                text += f", about {event['queue_ahead']} job(s) ahead"
            text += "; ^C cancels)" if self.tty else ")"
        elif event.get("reason") and state not in ("ready",):
            text += f": {event['reason']}"
        if text == self.last and not self.tty:
            return
        self.last = text
        if self.tty:
            self.ticks += 1
            self.stream.write(f"\r\033[K{_SPIN[self.ticks % 4]} sbroker: {text}")
        else:
            self.stream.write(f"sbroker: {text}\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self.last:
            self.stream.write("\r\033[K")
            self.stream.flush()


def split_project(command: str | None, env_project: str | None) -> tuple[str | None, str | None]:
    """``(project, command)`` from ``@project rest`` or the environment."""
    project = env_project or None
    if command is not None:
        stripped = command.lstrip()
        if stripped.startswith("@"):
            word, _, rest = stripped.partition(" ")
            project = word[1:] or project
            command = rest.strip() or None
    return project, command


def split_profile(project: str | None, env_profile: str | None) -> tuple[str | None, str | None]:
    """``(project, profile)`` from ``project:profile`` (the ``@`` word), else the environment's."""
    profile = env_profile or None
    if project is not None and ":" in project:
        project, _, named = project.partition(":")
        profile = named or profile
    return project or None, profile


USAGE = """\
usage: sbroker login [--socket PATH]

sshd's ForceCommand for sbroker users (installed as session_scripts/sbroker-login, which
is also their login shell on login nodes). It connects this SSH login to the user's
container session inside a SLURM allocation, creating the session once if needed:

  ssh login-node                     an interactive shell in the session (project: default)
  ssh login-node @proj               the same for project "proj" (or SendEnv SBROKER_PROJECT)
  ssh login-node [@proj] CMD ...     run CMD in the session (scp, sftp and rsync work too)
  ssh login-node @proj:gpu           a new session of "proj" sized by profile "gpu" (or SendEnv
                                     SBROKER_PROFILE); @:gpu for the default project

  --socket PATH   the broker's socket (default {default}); never taken from the
                  environment, which is the user's to set
  -h, --help      show this help and exit (nothing is contacted)
"""


def parse_argv(argv: list[str] | None) -> tuple[str | None, str | None]:
    """``(socket, error)``; ``(None, None)`` means --help. ``--socket PATH`` / ``--socket=PATH``
    from the wrapper, else the default socket.

    Deliberately not ``$SBROKER_SOCKET``: see the module docstring.
    """
    args = list(argv or [])
    path = DEFAULT_SOCKET
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            return None, None
        if arg == "--socket" and i + 1 < len(args):
            path, i = args[i + 1], i + 2
            continue
        if arg.startswith("--socket="):
            path, i = arg.partition("=")[2], i + 1
            continue
        return path, f"sbroker login: unknown argument {arg[:80]!r} (see sbroker login --help)"
    if not path.startswith("/"):
        return path, "sbroker: --socket: must be an absolute path"
    return path, None


def main(argv: list[str] | None = None) -> int:
    path, problem = parse_argv(argv)
    if path is None:
        sys.stdout.write(USAGE.format(default=DEFAULT_SOCKET))
        return 0
    if problem:
        sys.stderr.write(problem + "\n")
        return 2
    command = os.environ.get("SSH_ORIGINAL_COMMAND")
    project, command = split_project(command, os.environ.get("SBROKER_PROJECT"))
    project, profile = split_profile(project, os.environ.get("SBROKER_PROFILE"))
    endpoint = None
    if command is not None and command.split()[:1] == ["sbroker"]:
        reserved = builtin(command.split()[1:], project, path, profile)
        if isinstance(reserved, int):
            return reserved
        endpoint, command = reserved, None
    has_tty = os.isatty(0) and os.isatty(1)
    progress = Progress(sys.stderr)
    term = os.environ.get("TERM", "")[:64]
    fields: dict[str, object] = {"project": project, "profile": profile}
    if endpoint is not None:
        fields["endpoint"] = endpoint
    elif command is not None:
        fields.update(command=command, tty=has_tty, term=term)
    else:
        fields["attach"] = {"mode": "write", "tty": has_tty, "term": term}
        fields["early"] = True  # the terminal may start while the session's instance starts
        if has_tty:
            fields["ask"] = True  # at a busy partition's forecast: go on, another profile, or cancel
    try:
        client = Client(path, require_root=True)
    except BrokerError as exc:
        sys.stderr.write(f"sbroker: {exc.message}\n")
        return 1
    early = Early(progress)
    try:
        result = client.request("ensure", on_progress=early, on_question=_ask_busy(progress), **fields)
    except KeyboardInterrupt:  # ^C while waiting: the broker cancels what this login submitted
        early.abandon()
        progress.done()
        from .loginprompt import cancel_wait

        sys.stderr.write(f"sbroker: {cancel_wait(client)}\n")
        client.close()
        return 130
    except BrokerError as exc:
        client.close()
        early.abandon()
        progress.done()
        if exc.code == "profile_mismatch" and command is None and has_tty:
            from .loginprompt import retry_after_mismatch

            fields.pop("early", None)  # the retry waits for its session the plain way
            return retry_after_mismatch(path, exc.message, fields, progress, run_exec)
        sys.stderr.write(f"sbroker: {exc.message}\n")
        return 1
    progress.done()
    client.close()
    if "local" in result:  # a transfer on shared storage: the login node's own server, confined
        from . import loginxfer

        status = loginxfer.run(result["local"])  # returns only if it could not exec it
        if status is not None:
            return status
        # No Landlock here (or no such server): the session's own path, asked for plainly.
        try:
            with Client(path, require_root=True) as again:
                result = again.request("ensure", on_progress=progress, **{**fields, "local": False})
        except BrokerError as exc:
            progress.done()
            sys.stderr.write(f"sbroker: {exc.message}\n")
            return 1
        progress.done()
    if "direct" in result:
        from . import direct

        spec = result["direct"]
        return direct.run(spec["host"], spec["port"], spec["key"], spec["argv"])
    if early.started is not None and "exec" not in result:
        from .srunexec import finish_command

        return finish_command(*early.started)
    early.abandon()  # the session moved to another job (two login nodes raced): that one's terminal
    return run_exec(result["exec"])


class Early:
    """Progress events of an ``ensure``, and the one that starts the terminal early: the broker
    sends ``early`` (the attach argv) once the new session's agent is up, while its instance
    still starts; the agent holds the shell until the instance is up. The ``srun`` launch then
    overlaps the instance's start instead of following it."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.started: tuple[int, int] | None = None
        self.saved: list | None = None

    def __call__(self, event: dict[str, object]) -> None:
        spec = event.get("early")
        if self.started is not None:
            return  # the terminal is srun's now: no more progress lines on it
        if not isinstance(spec, dict):
            self.progress(event)
            return
        from .srunexec import start_command

        self.progress.done()
        if os.isatty(0):
            import termios

            self.saved = termios.tcgetattr(0)  # srun --pty makes the terminal raw
        argv, env = spec["argv"], spec["env"]
        started = start_command(_which(argv[0], env.get("PATH", "/usr/bin:/bin")), argv, env)
        if not isinstance(started, int):
            self.started = started

    def abandon(self) -> None:
        """The session failed after all: end the early terminal before saying why."""
        if self.started is None:
            return
        import signal

        from .srunexec import finish_command

        pid, _ = self.started
        try:
            os.kill(pid, signal.SIGKILL)  # srun's own SIGHUP/SIGTERM handling prints step noise
        except ProcessLookupError:
            pass
        finish_command(*self.started)
        self.started = None
        if self.saved is not None:
            import termios

            try:
                termios.tcsetattr(0, termios.TCSADRAIN, self.saved)
            except termios.error:
                pass


def builtin(words: list[str], project: str | None, socket_path: str = DEFAULT_SOCKET,
            profile: str | None = None) -> int | str:
    """``ssh host sbroker ssh-proxy|ssh-config|extend``: handled here, never run in the session.

    Returns ``"ssh"`` when the login goes on to the session's SSH endpoint, else the exit
    status of what was done here.
    """
    if words == ["extend"]:
        return extend(socket_path, project)
    import pwd

    from . import sshendpoint

    me = pwd.getpwuid(os.getuid())
    try:
        if words[:1] == ["ssh-config"]:
            return sshendpoint.ssh_config(me.pw_dir, me.pw_name, project, words[1:], sys.stdout, profile)
        if words == ["ssh-proxy"]:
            sshendpoint.ensure_host_key(me.pw_dir)
            return "ssh"
    except sshendpoint.EndpointError as exc:
        sys.stderr.write(f"sbroker: {exc}\n")
        return 1
    sys.stderr.write("sbroker: over ssh, `sbroker` takes ssh-proxy (the ProxyCommand of an SSH entry into "
                     "your session), ssh-config (prints that entry) or extend (raises the session's time "
                     "limit)\n")
    return 2


def extend(socket_path: str, project: str | None) -> int:
    """``ssh login-node [@project] sbroker extend``: ``sbroker extend`` through the SSH login
    path, so it also works from inside the session (which has ``ssh``, not ``sbroker``): the
    broker knows the caller from the socket, as for any login."""
    try:
        with Client(socket_path, require_root=True) as client:
            reply = client.request("extend", session=project)
    except BrokerError as exc:
        sys.stderr.write(f"sbroker: {exc.message}\n")
        return 1
    sys.stdout.write(f"{reply['project']} (job {reply['job_id']}): time limit {reply['old']} -> {reply['new']}"
                     f" (at most {reply['max']} here)\n")
    return 0


def _ask_busy(progress: Progress) -> object:
    """The answer to the broker's question at a busy partition (asked on a terminal only)."""
    def answer(question: dict[str, object]) -> str:
        progress.done()
        from .loginprompt import ask_busy

        return ask_busy(question)
    return answer


def run_exec(spec: dict[str, object]) -> int:
    """Run the broker's ``{"argv", "env"}`` answer as this user; return its exit status."""
    from .srunexec import run_command

    argv, env = spec["argv"], spec["env"]
    return run_command(_which(argv[0], env.get("PATH", "/usr/bin:/bin")), argv, env)


def _which(name: str, path: str) -> str:
    if "/" in name:
        return name
    for directory in path.split(":"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return name
