"""Run ``ssh host cmd`` over a direct stream to the session agent (standard library only).

Imported by ``sbroker login`` for commands without a terminal (scp, sftp, rsync, ``ssh
host 'cat f'``): the command's stdin and stdout are a TCP connection straight to the
session's agent on the compute node (:class:`broker.agent.sessionagent.Streams`), which
hands it to the command as fds 0 and 1. ``srun``'s stdio forwarding, which caps transfers
at a third of ssh's speed, is not in the path: the bytes go from sshd's pipes to the socket
by ``splice`` (one thread each way) and through the kernel's TCP stack, nothing else.

Both sides prove they know the session key (a file only the user can read) before any
data moves; see the agent's docstring. A failure to reach or authenticate the agent is one
line on stderr and status 255, as ssh reports a failed connection.

Imports are what every ``ssh host cmd`` pays before its first byte moves, so this module takes
the C cores where the Python layer above them only costs time here: ``_socket`` for two
TCP connections (``socket`` imports ``selectors`` and builds its enum classes: 2.7 ms),
``_thread`` for two daemon threads (``threading``: 2 ms), the built-in SHA-256 for one HMAC
(``hashlib`` and ``hmac`` load OpenSSL's libcrypto: 5 ms), ``os.urandom`` for a nonce
(``secrets`` imports ``hmac``, ``random`` and ``base64``), and the protocol's ``json`` codec
(``json`` imports ``re`` and ``enum``: 9 ms).
"""

from __future__ import annotations

import _signal as signal  # the C half of ``signal`` (``signal.py`` builds enum classes)
import _socket
import _thread
import errno
import fcntl
import os
import select
import struct
import sys

try:
    from _sha2 import sha256  # CPython >= 3.12
except ImportError:
    try:
        from _sha256 import sha256  # CPython 3.11
    except ImportError:  # a build without the built-in hashes (FIPS builds): OpenSSL's
        from hashlib import sha256

from .protocol import dumps, loads  # ``json`` without ``import json`` (``re``, ``enum``: 9 ms)

MAGIC = b"SBA1"
NONCE = 32
CONNECT_TIMEOUT = 10.0
EXIT_LOST = 255
#: After the command's exit status arrives, how long its stdout may still drain.
DRAIN_AFTER_EXIT = 5.0
_HEADER = struct.Struct(">cI")
CHUNK = 1 << 20


class StreamError(Exception):
    """The agent could not be reached, or did not prove it is this session's."""


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104), as ``hmac.new(key, message, hashlib.sha256).digest()``."""
    if len(key) > 64:  # SHA-256's block size
        key = sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = sha256(bytes(k ^ 0x36 for k in key) + message).digest()
    return sha256(bytes(k ^ 0x5C for k in key) + inner).digest()


def _mac(key: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return _hmac_sha256(key, role + client_nonce + server_nonce)


def _same(a: bytes, b: bytes) -> bool:
    """``a == b`` in a time that does not depend on where they differ (``hmac.compare_digest``)."""
    differ = len(a) ^ len(b)
    for x, y in zip(a, b):
        differ |= x ^ y
    return differ == 0


def _recv_exactly(sock: _socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise StreamError("the session agent closed the connection during the handshake")
        data += chunk
    return data


def _recv_line(sock: _socket.socket) -> dict[str, object]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk or len(data) > 65536:
            raise StreamError("the session agent did not answer the request")
        data += chunk
    return loads(data.decode())


def _connect(host: str, port: int) -> _socket.socket:
    """``socket.create_connection((host, port), CONNECT_TIMEOUT)``: each address in turn."""
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM):
        sock = _socket.socket(family, kind, proto)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def open_stream(host: str, port: int, key: bytes, request: dict[str, object]) -> tuple[_socket.socket, dict]:
    """Connect, authenticate both ways, send ``request``; return the socket and the reply."""
    try:
        sock = _connect(host, port)
    except OSError as exc:
        raise StreamError(f"cannot reach the session agent at {host}:{port}: {exc.strerror or exc}") from None
    try:
        # Small writes answered by the peer: without TCP_NODELAY, Nagle holds each second write
        # until the first is acknowledged, and the peer delays that ACK by 40 ms. The socket
        # becomes the command's stdin, and sftp and rsync are request/reply protocols too.
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        client_nonce = os.urandom(NONCE)
        sock.sendall(MAGIC + client_nonce)
        answer = _recv_exactly(sock, NONCE + 32)
        server_nonce, proof = answer[:NONCE], answer[NONCE:]
        if not _same(proof, _mac(key, b"server", client_nonce, server_nonce)):
            raise StreamError(f"the listener at {host}:{port} is not this session's agent (wrong key proof)")
        sock.sendall(_mac(key, b"client", client_nonce, server_nonce) + dumps(request).encode() + b"\n")
        reply = _recv_line(sock) if request.get("op") == "exec" else {}
    except OSError as exc:
        sock.close()
        raise StreamError(f"the session agent at {host}:{port}: {exc.strerror or exc}") from None
    except StreamError:
        sock.close()
        raise
    sock.settimeout(None)
    return sock, reply


def read_key(path: str) -> bytes:
    """The session key (hex in a file of the user's, beside the job log)."""
    try:
        with open(path, "rb") as fh:
            return bytes.fromhex(fh.read(200).decode().strip())
    except (OSError, ValueError) as exc:
        raise StreamError(f"cannot read the session key {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _pump(src: int, dst: int, on_end=None) -> None:
    """Move bytes until EOF, by ``splice(2)`` where one side is a pipe, else ``read``/``write``.

    sshd gives the command pipes, so the bytes go from its pipe to the socket and back
    without a copy through this process. Both are used non-blocking (a blocking ``splice``
    from a socket can wait for more than is there, stalling request/reply protocols such as
    sftp): a step is tried first, and only when it would block does the pump wait in ``poll``,
    for the source, or for the destination when the source was readable and still nothing
    moved (it is full). A step that moved less than it could most likely emptied the source:
    the pump waits for the source at once (returning at once if more came) instead of trying
    a step bound to fail. A request/reply exchange is then one wait and one step per message.
    """
    readable, writable = select.poll(), select.poll()  # made once, not at every wait
    readable.register(src, select.POLLIN)
    writable.register(dst, select.POLLOUT)
    use_splice = hasattr(os, "splice")
    source_ready = False  # the source was readable at the last wait and nothing moved since
    try:
        while True:
            try:
                if use_splice:
                    moved = os.splice(src, dst, CHUNK, flags=os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE)
                else:
                    data = os.read(src, CHUNK)
                    moved = len(data)
            except BlockingIOError:
                if source_ready:
                    writable.poll()
                    source_ready = False
                else:
                    readable.poll()
                    source_ready = True
                continue
            except OSError as exc:
                if not use_splice or exc.errno != errno.EINVAL:  # EINVAL: neither side is a pipe
                    raise
                use_splice = False
                continue
            if not moved:
                break
            if not use_splice:
                view = memoryview(data)
                while view:
                    try:
                        view = view[os.write(dst, view):]
                    except BlockingIOError:
                        writable.poll()
            source_ready = False
            if moved < CHUNK:
                readable.poll()
                source_ready = True
    except OSError:
        pass
    finally:
        if on_end is not None:
            on_end()


def _when_reader_gone(fd: int, then) -> None:
    """Call ``then()`` once nobody can read ``fd`` any more (POLLERR/POLLHUP on a pipe or
    socket; a regular file or /dev/null never reports it)."""
    poller = select.poll()
    poller.register(fd, 0)  # no events asked: only the error and hang-up conditions come back
    while True:
        for _, events in poller.poll():
            if events & select.POLLNVAL:
                return
            if events & (select.POLLERR | select.POLLHUP):
                then()
                return


def _widen_pipes(*fds: int) -> None:
    """Ask for 1 MiB pipe buffers on sshd's pipes (the unprivileged maximum by default): fewer
    wake-ups of sshd and of the splice per MiB. Not a pipe, or refused: left as it is."""
    for fd in fds:
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, CHUNK)
        except (OSError, AttributeError):
            pass


def run(host: str, port: int, key_path: str, argv: list[str]) -> int:
    """Run ``argv`` in the session through its agent; return its exit status."""
    try:
        key = read_key(key_path)
        data, reply = open_stream(host, port, key, {"op": "exec", "argv": argv})
        if "token" not in reply:
            data.close()
            raise StreamError(str(reply.get("error") or "the session agent refused the command"))
        control, _ = open_stream(host, port, key, {"op": "stderr", "token": reply["token"]})
    except StreamError as exc:
        sys.stderr.write(f"sbroker: {exc}\n")
        return EXIT_LOST

    def hang_up(signum: int, frame: object) -> None:
        # sshd hung up: closing the control connection makes the agent hang the command up.
        try:
            control.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass

    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, hang_up)
    # Without a terminal sshd sends no signal when the client's connection drops: it exits, and
    # the reading end of our stdout goes with it. That is the hang-up to pass on.
    _thread.start_new_thread(_when_reader_gone, (1, lambda: hang_up(signal.SIGHUP, None)))
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def stdin_done() -> None:
        try:
            data.shutdown(_socket.SHUT_WR)  # the command reads EOF
        except OSError:
            pass

    data.setblocking(False)
    _widen_pipes(0, 1)
    downloaded = _thread.allocate_lock()
    downloaded.acquire()  # released by the download pump at its end
    _thread.start_new_thread(_pump, (0, data.fileno(), stdin_done))
    _thread.start_new_thread(_pump, (data.fileno(), 1, downloaded.release))
    status = _control_loop(control)
    downloaded.acquire(timeout=DRAIN_AFTER_EXIT)
    data.close()
    control.close()
    return status


def _control_loop(control: _socket.socket) -> int:
    """Write the command's stderr frames to fd 2 until its exit status arrives."""
    buf = bytearray()
    while True:
        try:
            chunk = control.recv(1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            sys.stderr.write("sbroker: the session agent went away before the command ended\n")
            return EXIT_LOST
        buf += chunk
        while len(buf) >= _HEADER.size:
            kind, length = _HEADER.unpack(bytes(buf[:_HEADER.size]))
            if len(buf) < _HEADER.size + length:
                break
            payload = bytes(buf[_HEADER.size:_HEADER.size + length])
            del buf[:_HEADER.size + length]
            if kind == b"O":
                view = memoryview(payload)
                while view:
                    try:
                        view = view[os.write(2, view):]
                    except OSError:
                        break
            elif kind == b"J":
                message = loads(payload.decode())
                if message.get("type") == "exit":
                    return int(message.get("status", EXIT_LOST))
