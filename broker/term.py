"""Client end of an attached terminal: raw local tty, framed bridge, exact exit status.

Standard library only (it runs in ``sbroker login``). The local tty is put in raw
mode so every key, ^C included, reaches the remote shell; it is restored on every
way out (normal exit, broker gone, SIGHUP/SIGTERM from sshd). SIGWINCH becomes a
``resize`` message. Output is written to stdout with blocking writes, so a slow
terminal slows the broker's reads of the pty instead of filling memory.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import signal
import struct
import sys
import termios
import tty

from . import protocol as p
from .client import BrokerError, Client

if False:  # for type checkers only: typing costs every SSH login time
    from collections.abc import Callable

EXIT_LOST = 255


def window_size(fd: int) -> tuple[int, int]:
    """``(rows, cols)`` of a tty, or a sane default when it reports nonsense."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return 24, 80
    if not (1 <= rows <= 1000 and 1 <= cols <= 1000):
        return 24, 80
    return rows, cols


class _RawTTY:
    """The terminal ``fd`` in raw mode while entered (``None``: leave the terminal as it is)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.saved: list[object] | None = None

    def __enter__(self) -> _RawTTY:
        if self.fd is not None and os.isatty(self.fd):
            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        if self.saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSAFLUSH, self.saved)
            except termios.error:
                pass
            self.saved = None


def attach_request(mode: str = "write") -> dict[str, object]:
    """The attach parameters of this terminal (mode, window size, TERM)."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    rows, cols = window_size(stdin if os.isatty(stdin) else stdout)
    return {"mode": mode, "rows": rows, "cols": cols, "term": os.environ.get("TERM", "xterm-256color")[:64],
            "tty": os.isatty(stdin) and os.isatty(stdout)}


def attach(session: str, *, mode: str = "write", client: Client | None = None, requested: bool = False,
           write_other: bool = False, first: dict[str, object] | None = None) -> int:
    """Attach this process's terminal to a session's shell bridged by the broker; return its exit status.

    The broker bridges only an administrator's attach to someone else's session (the
    owner's own terminals reach the session agent directly, :mod:`broker.attach`).
    ``requested`` means the attach was already sent on ``client``, and ``first`` is the
    broker's ``attached`` reply when it has been read. ``write_other`` asks to type into
    someone else's shell (audited); without it the broker answers with ``observe`` and
    this side then stops sending keys.
    """
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    os.set_blocking(stdout, True)  # blocking writes are the backpressure
    client = client or Client()
    if not requested:
        request = {"v": p.VERSION, "op": "attach", "session": session, **attach_request(mode)}
        if write_other:
            request["write_other"] = True
        client.send(request)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    stop = {"signal": 0}

    wake = {signal.SIGWINCH: b"W", signal.SIGHUP: b"S", signal.SIGTERM: b"S"}
    if mode == "write":  # passed on to the shell (in raw mode ^C and ^\ arrive as keys instead)
        wake.update({signal.SIGINT: b"I", signal.SIGQUIT: b"Q"})
    else:  # an interrupted observer stops observing
        wake.update({signal.SIGINT: b"S", signal.SIGQUIT: b"S"})

    def on_signal(signum: int, frame: object) -> None:
        if wake[signum] == b"S":
            stop["signal"] = signum
        try:
            os.write(wake_w, wake[signum])
        except OSError:
            pass

    old_handlers = {s: signal.signal(s, on_signal) for s in wake}
    sel = selectors.DefaultSelector()
    sel.register(client.sock, selectors.EVENT_READ, "sock")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    if mode == "write":
        try:
            sel.register(stdin, selectors.EVENT_READ, "stdin")
        except (PermissionError, ValueError):  # a regular file or /dev/null: nothing to type
            pass
    # Raw only for a writer: an observer's keys are never read, so its terminal stays cooked
    # and ^C is a SIGINT that ends observing (as when the broker turns a writer into one).
    raw = _RawTTY(stdin if mode == "write" else None)

    def on_control(message: dict[str, object]) -> None:
        if message.get("type") == "attached" and message.get("mode") == "observe" and "stdin" in wake_targets:
            # The broker made this an observer (someone else's shell): stop typing, ^C leaves.
            wake.update({signal.SIGINT: b"S", signal.SIGQUIT: b"S"})
            sel.unregister(stdin)
            wake_targets.discard("stdin")
            raw.restore()
            sys.stderr.write("sbroker: observing read-only (someone else's shell: `sbroker attach --write` "
                             "to type into it, audited and shown to its owner); ^C to leave\r\n")

    wake_targets = {key.data for key in sel.get_map().values()}
    try:
        with raw:
            if first is not None:
                on_control(first)
            # Frames that arrived with the reply are already buffered in the client.
            status = _handle_frames(client.take_pending(), stdout, on_control)
            if status is not None:
                return status
            while True:
                for key, _ in sel.select():
                    if key.data == "stdin":
                        data = os.read(stdin, p.MAX_DATA)
                        if not data:
                            sel.unregister(stdin)
                            client.send({"type": "eof"})
                        else:
                            client.send_data(data)
                    elif key.data == "wake":
                        signals = os.read(wake_r, 64)
                        if b"S" in signals:
                            return 128 + stop["signal"]
                        for byte, name in ((b"I", "INT"), (b"Q", "QUIT")):
                            if byte in signals:
                                client.send({"type": "signal", "signal": name})
                        if b"W" in signals:
                            rows, cols = window_size(stdin if os.isatty(stdin) else stdout)
                            client.send({"type": "resize", "rows": rows, "cols": cols})
                    else:
                        chunk = client.sock.recv(1 << 18)
                        if not chunk:
                            raw.restore()
                            sys.stderr.write("sbroker: connection to the broker was lost\r\n")
                            return EXIT_LOST
                        status = _handle_frames(client.feed(chunk), stdout, on_control)
                        if status is not None:
                            return status
    finally:
        raw.restore()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        sel.close()
        os.close(wake_r)
        os.close(wake_w)
        client.close()


def _handle_frames(frames: list[tuple[bytes, bytes]], stdout: int,
                   on_control: Callable[[dict[str, object]], None] | None = None) -> int | None:
    """Write output frames; return the exit status once the shell has ended.

    Consecutive output frames go out in one write: fewer system calls per byte on a
    stream of output, and the terminal sees the same bytes in the same order.
    """
    pending: list[bytes] = []
    for kind, payload in frames:
        if kind == p.KIND_OUTPUT:
            pending.append(payload)
            continue
        if pending:
            _write_all(stdout, b"".join(pending))
            pending = []
        message = p.decode_json(payload)
        if message.get("type") == "exit":
            return int(message.get("status", EXIT_LOST))
        if message.get("type") == "error":
            raise BrokerError(str(message.get("message")), str(message.get("code")))
        if on_control is not None:
            on_control(message)
    if pending:
        _write_all(stdout, b"".join(pending))
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
