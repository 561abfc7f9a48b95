"""Run a command's ``srun`` for ``sbroker login``: SSH channel as stdin/stdout, filtered stderr.

Imported only on the command path (``ssh host cmd``, scp, sftp, rsync), so interactive
logins do not pay for :mod:`re`.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys

#: srun's own report of a non-zero exit (``error()`` in srun's launch code). No srun
#: option removes only this line: ``--quiet`` twice lowers srun's log level to "fatal",
#: which also hides real errors (e.g. "Unable to create step for job J"). So srun keeps
#: its default verbosity and exactly this line is dropped from its stderr.
SRUN_EXIT_LINE = re.compile(rb"srun: error: [^\s:]+: tasks? [0-9,\[\]-]+: Exited with exit code [0-9]+\r?\n")
_SRUN_PREFIX = b"srun: error: "
#: How long a line start that may be srun's report is held back before it is passed on.
HOLD_SECONDS = 0.05


class StderrFilter:
    """Pass srun's stderr through byte for byte, minus :data:`SRUN_EXIT_LINE`.

    A candidate is dropped when it starts a line (or a read: srun writes it in one
    ``write``) and is the whole line. Only a line start that could still become the
    report (a prefix of ``srun: error: ...`` without its newline) is held back, and only
    until :meth:`flush` (called after :data:`HOLD_SECONDS` without input, and at EOF).
    """

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> bytes:
        buf = self.pending + data
        self.pending = b""
        out = bytearray()
        start, bol = 0, True
        while start < len(buf):
            nl = buf.find(b"\n", start)
            if nl < 0:
                rest = buf[start:]
                if bol and len(rest) < 512 and (_SRUN_PREFIX.startswith(rest) or rest.startswith(_SRUN_PREFIX)):
                    self.pending = rest
                else:
                    out += rest
                break
            line = buf[start:nl + 1]
            if not (bol and SRUN_EXIT_LINE.fullmatch(line)):
                out += line
            start, bol = nl + 1, True
        return bytes(out)

    def flush(self) -> bytes:
        data, self.pending = self.pending, b""
        return data


def run_command(path: str, argv: list[str], env: dict[str, str]) -> int:
    """Run ``srun`` with the SSH channel as stdin/stdout and a filtered stderr; return its status.

    stdin and stdout are inherited as they are (binary-safe, no copy through this
    process); only stderr passes through :class:`StderrFilter`. SIGHUP and SIGTERM
    (sshd hanging up) are passed on to srun, which then cancels the step.
    """
    started = start_command(path, argv, env)
    return started if isinstance(started, int) else finish_command(*started)


def start_command(path: str, argv: list[str], env: dict[str, str]) -> tuple[int, int] | int:
    """The first half of :func:`run_command`: ``(pid, stderr_fd)`` of the started ``srun``, or
    its exit status when it could not start. A login that starts its terminal while the broker
    still finishes the session (an early attach) calls :func:`finish_command` later."""
    try:
        read_fd, write_fd = os.pipe()
    except OSError as exc:
        sys.stderr.write(f"sbroker: cannot run {argv[0]}: {exc.strerror}\n")
        return 127
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child: become srun
        try:
            os.close(read_fd)
            os.close(status_r)
            os.dup2(write_fd, 2)
            os.close(write_fd)
            for sig in (signal.SIGPIPE, signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            os.execve(path, argv, env)
        except OSError as exc:
            os.write(status_w, (exc.strerror or str(exc)).encode()[:200])
        finally:
            os._exit(127)
    os.close(write_fd)
    os.close(status_w)

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, forward)
    signal.signal(signal.SIGINT, lambda *_: None)  # srun gets its own (terminal) SIGINT
    failure = b""
    while True:
        chunk = os.read(status_r, 256)
        if not chunk:
            break
        failure += chunk
    os.close(status_r)
    if failure:
        sys.stderr.write(f"sbroker: cannot run {argv[0]}: {failure.decode(errors='replace')}\n")
    return pid, read_fd


def finish_command(pid: int, read_fd: int) -> int:
    """Relay the started ``srun``'s stderr until it closes, reap it, return its exit status."""
    _relay_stderr(read_fd, StderrFilter())
    os.close(read_fd)
    while True:
        try:
            _, wait_status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            return 127
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def _relay_stderr(fd: int, filt: StderrFilter) -> None:
    out = 2
    broken = False

    def write(data: bytes) -> None:
        nonlocal broken
        view = memoryview(data)
        while view and not broken:
            try:
                view = view[os.write(out, view):]
            except BlockingIOError:
                select.select([], [out], [])
            except OSError:  # the client went away: keep draining so srun never blocks
                broken = True

    while True:
        try:
            ready, _, _ = select.select([fd], [], [], HOLD_SECONDS if filt.pending else None)
        except InterruptedError:
            continue
        if not ready:
            write(filt.flush())
            continue
        try:
            data = os.read(fd, 1 << 16)
        except InterruptedError:
            continue
        if not data:
            write(filt.flush())
            return
        write(filt.feed(data))
