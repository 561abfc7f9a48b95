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
from typing import Any

from . import protocol as p
from .client import BrokerError, Client

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
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: list[Any] | None = None

    def __enter__(self) -> _RawTTY:
        if os.isatty(self.fd):
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


def attach(session: str, *, mode: str = "write", client: Client | None = None) -> int:
    """Attach this process's terminal to a session's shell; return the shell's exit status."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    os.set_blocking(stdout, True)  # blocking writes are the backpressure
    rows, cols = window_size(stdin if os.isatty(stdin) else stdout)
    client = client or Client()
    client.send({"v": p.VERSION, "op": "attach", "session": session, "mode": mode,
                 "rows": rows, "cols": cols, "term": os.environ.get("TERM", "xterm-256color")[:64]})
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    stop = {"signal": 0}

    def on_winch(signum: int, frame: Any) -> None:
        try:
            os.write(wake_w, b"W")
        except OSError:
            pass

    def on_stop(signum: int, frame: Any) -> None:
        stop["signal"] = signum
        try:
            os.write(wake_w, b"S")
        except OSError:
            pass

    old_handlers = {s: signal.signal(s, h) for s, h in
                    ((signal.SIGWINCH, on_winch), (signal.SIGHUP, on_stop), (signal.SIGTERM, on_stop))}
    sel = selectors.DefaultSelector()
    sel.register(client.sock, selectors.EVENT_READ, "sock")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    if mode == "write":
        try:
            sel.register(stdin, selectors.EVENT_READ, "stdin")
        except (PermissionError, ValueError):  # a regular file or /dev/null: nothing to type
            pass
    status = EXIT_LOST
    raw = _RawTTY(stdin)
    try:
        with raw:
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
                        rows, cols = window_size(stdin if os.isatty(stdin) else stdout)
                        client.send({"type": "resize", "rows": rows, "cols": cols})
                    else:
                        chunk = client.sock.recv(1 << 16)
                        if not chunk:
                            raw.restore()
                            sys.stderr.write("sbroker: connection to the broker was lost\r\n")
                            return EXIT_LOST
                        for kind, payload in client.feed(chunk):
                            if kind == p.KIND_OUTPUT:
                                _write_all(stdout, payload)
                                continue
                            message = p.decode_json(payload)
                            if message.get("type") == "exit":
                                status = int(message.get("status", EXIT_LOST))
                                return status
                            if message.get("type") == "error":
                                raise BrokerError(str(message.get("message")), str(message.get("code")))
    finally:
        raw.restore()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        sel.close()
        os.close(wake_r)
        os.close(wake_w)
        client.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
