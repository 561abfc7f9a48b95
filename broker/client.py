"""A small blocking client for the broker socket (standard library + protocol only).

Used by ``sbroker login`` on every SSH login and by the admin commands. It knows
nothing about identity: the daemon takes that from the socket.

It uses ``_socket``, the C core of ``socket``: ``socket.py`` imports ``selectors`` and builds
its enum classes, 2.7 ms of every ``ssh host cmd`` for names this module does not use.
"""

from __future__ import annotations

import _socket
import os
import struct

from . import protocol as p

if False:  # for type checkers only: importing typing helpers costs every SSH login time
    from collections.abc import Callable


class BrokerError(Exception):
    """The broker answered with an error, or could not be reached."""

    def __init__(self, message: str, code: str = "error", field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.field = field


def socket_path() -> str:
    """The socket for admin commands run from an ordinary shell (``sbroker ls`` ...).

    ``sbroker login`` never calls this: its socket comes from root's files only.
    """
    return os.environ.get("SBROKER_SOCKET") or p.DEFAULT_SOCKET


class Client:
    def __init__(self, path: str | None = None, timeout: float | None = None, *,
                 require_root: bool = False) -> None:
        """Connect; with ``require_root`` the listening process must be uid 0 (``SO_PEERCRED``).

        The login path asks for it: a broker answers with the argv the login execs, so a
        socket served by anyone but root could hand out a login-node shell.
        """
        self.path = path or socket_path()
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as exc:
            self.sock.close()
            raise BrokerError(f"broker not reachable at {self.path}: {exc.strerror or exc}",
                              code="unreachable") from None
        if require_root:
            uid = struct.unpack("3i", self.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))[1]
            if uid != 0:
                self.sock.close()
                raise BrokerError(f"broker at {self.path} is not run by root (uid {uid}); refusing to use it",
                                  code="untrusted")
        self._buf = bytearray()
        self._pending: list[tuple[bytes, bytes]] = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, message: dict[str, object]) -> None:
        self.sock.sendall(p.encode_request(message))

    def send_data(self, data: bytes) -> None:
        for start in range(0, len(data), p.MAX_DATA):
            self.sock.sendall(p.encode(p.KIND_INPUT, data[start:start + p.MAX_DATA]))

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Add received bytes; return the frames they complete."""
        self._buf += data
        out = []
        while len(self._buf) >= p.HEADER.size:
            kind, length = p.parse_header(bytes(self._buf[:p.HEADER.size]), max_json=p.MAX_REPLY)
            end = p.HEADER.size + length
            if len(self._buf) < end:
                break
            out.append((kind, bytes(self._buf[p.HEADER.size:end])))
            del self._buf[:end]
        return out

    def recv_frame(self) -> tuple[bytes, bytes]:
        while not self._pending:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise BrokerError("broker closed the connection", code="closed")
            self._pending.extend(self.feed(chunk))
        return self._pending.pop(0)

    def take_pending(self) -> list[tuple[bytes, bytes]]:
        """Frames already read from the socket but not yet handed out."""
        frames, self._pending = self._pending, []
        return frames

    def recv(self) -> dict[str, object]:
        kind, payload = self.recv_frame()
        if kind != p.KIND_JSON:
            raise BrokerError("unexpected data frame from broker", code="protocol")
        return p.decode_json(payload, max_depth=None)

    def request(self, op: str, on_progress: Callable[[dict[str, object]], None] | None = None,
                on_question: Callable[[dict[str, object]], str] | None = None,
                **fields: object) -> dict[str, object]:
        """Send one request; hand progress events to ``on_progress`` and questions (asked only
        of a request that says ``ask``) to ``on_question``; return the result."""
        self.send({"v": p.VERSION, "op": op, **fields})
        while True:
            message = self.recv()
            kind = message.get("type")
            if kind == "progress":
                if on_progress:
                    on_progress(message)
                continue
            if kind == "question":
                self.send({"type": "answer", "choice": on_question(message) if on_question else "go"})
                continue
            if kind == "error":
                raise BrokerError(str(message.get("message", "error")), str(message.get("code", "error")),
                                  str(message.get("field", "")))
            return message


def call(op: str, **fields: object) -> dict[str, object]:
    """One request on a fresh connection."""
    with Client() as client:
        return client.request(op, **fields)
