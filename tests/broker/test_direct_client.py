"""The login client's side of a direct stream, without a cluster: its handshake crypto (a
hand-written HMAC over the built-in SHA-256, so that no ``ssh host cmd`` loads OpenSSL), what
the direct path imports, and the relay loop between a pipe and a socket."""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

from hypothesis import given
from hypothesis import strategies as st

from broker import direct


@given(key=st.binary(max_size=200), message=st.binary(max_size=300))
def test_hmac_is_rfc2104_hmac_sha256(key, message):
    """Keys shorter than, equal to and longer than the 64-byte block all agree with ``hmac``."""
    assert direct._hmac_sha256(key, message) == hmac.new(key, message, hashlib.sha256).digest()


def test_mac_binds_role_and_both_nonces():
    key, a, b = bytes(range(32)), b"\x01" * 32, b"\x02" * 32
    assert direct._mac(key, b"server", a, b) == hmac.new(key, b"server" + a + b, hashlib.sha256).digest()
    assert direct._mac(key, b"server", a, b) != direct._mac(key, b"client", a, b)
    assert direct._mac(key, b"server", a, b) != direct._mac(key, b"server", b, a)


@given(a=st.binary(max_size=40), b=st.binary(max_size=40))
def test_same_is_equality(a, b):
    assert direct._same(a, b) == (a == b)
    assert direct._same(a, a)


def test_same_sees_a_difference_in_any_byte_and_in_the_length():
    proof = bytes(range(32))
    for i in range(32):
        assert not direct._same(proof, proof[:i] + bytes([proof[i] ^ 1]) + proof[i + 1:])
    assert not direct._same(proof, proof[:31])
    assert not direct._same(proof, proof + b"\0")


def test_without_builtin_hashes_the_mac_uses_openssl():
    """A Python built without its own SHA-256 (FIPS builds) falls back to ``hashlib``'s."""
    code = ("import sys; sys.modules['_sha2'] = sys.modules['_sha256'] = None\n"
            "import hashlib, hmac; from broker import direct\n"
            "assert direct.sha256 is hashlib.sha256, direct.sha256\n"
            "assert direct._mac(b'k', b'server', b'a', b'b') == hmac.new(b'k', b'serverab', 'sha256').digest()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_direct_path_imports_neither_openssl_nor_the_python_socket_layers():
    """What ``ssh host cmd`` imports before its first byte: not ``hashlib``/``hmac`` (OpenSSL's
    libcrypto), ``secrets``, ``threading`` nor ``socket`` (see broker.direct's docstring)."""
    code = ("import sys; from broker.cli import main; import broker.login, broker.direct\n"
            "avoided = {'_hashlib', 'hashlib', 'hmac', 'secrets', 'random', 'threading', 'socket', 'selectors'}\n"
            "print(sorted(avoided & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    assert out.strip() == "[]"


def test_connect_tries_each_address_of_the_name_in_turn(monkeypatch):
    """As ``socket.create_connection``: of a name's addresses, the first that accepts is taken."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        refused = closed.getsockname()[1]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        tcp = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
        monkeypatch.setattr(direct._socket, "getaddrinfo", lambda host, *_: [
            (*tcp, ("127.0.0.1", refused)), (*tcp, ("127.0.0.1", port))] if host == "agent.example" else [])
        sock = direct._connect("agent.example", port)
        conn, peer = listener.accept()
        assert sock.getsockname() == peer and sock.getpeername() == ("127.0.0.1", port)
        conn.close()
        sock.close()
        with pytest.raises(OSError, match="no address for nowhere.example"):
            direct._connect("nowhere.example", port)


def test_a_port_nobody_listens_on_is_one_clear_error():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]  # closed below: nobody listens on it any more
    with pytest.raises(direct.StreamError, match=rf"cannot reach the session agent at 127.0.0.1:{port}: "
                                                  r"Connection refused"):
        direct.open_stream("127.0.0.1", port, b"k" * 32, {"op": "exec", "argv": ["true"]})


def _start_pump(src: int, dst: int, on_end=None) -> threading.Thread:
    pump = threading.Thread(target=direct._pump, args=(src, dst, on_end), daemon=True)
    pump.start()
    return pump


def test_pump_passes_each_message_on_without_waiting_for_more():
    """A request/reply protocol sends one message and waits for the answer: each byte that
    enters the pipe must come out of the socket with nothing more behind it."""
    r, w = os.pipe()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(30)
    pump = _start_pump(r, ours.fileno(), lambda: ours.shutdown(socket.SHUT_WR))
    for size in (1, 1, 7, 1, 65536, 3):
        message = os.urandom(size)
        os.write(w, message)
        got = b""
        while len(got) < size:
            got += theirs.recv(size - len(got))
        assert got == message
    os.close(w)
    assert theirs.recv(1) == b""  # EOF passed on
    pump.join(30)
    assert not pump.is_alive()
    for s in (ours, theirs):
        s.close()
    os.close(r)


def test_pump_waits_for_a_full_destination_and_loses_nothing():
    """The socket's buffers fill while the reader does not read; the pipe behind it fills too
    (the pump stopped at a full destination, with data in its source). Reading again, every
    byte arrives in order."""
    r, w = os.pipe()
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours.setblocking(False)
    payload = os.urandom(4 << 20)

    def write_all() -> None:
        os.write(w, payload)  # blocks while the pipe is full
        os.close(w)

    writer = threading.Thread(target=write_all, daemon=True)
    writer.start()
    pump = _start_pump(r, ours.fileno(), lambda: ours.shutdown(socket.SHUT_WR))
    pipe_size = fcntl.fcntl(r, fcntl.F_GETPIPE_SZ)
    deadline = time.monotonic() + 30
    while struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, b"\0" * 4))[0] < pipe_size:
        assert time.monotonic() < deadline, "the pipe never filled up behind the full socket"
        time.sleep(0.01)
    theirs.settimeout(30)
    got = bytearray()
    while chunk := theirs.recv(1 << 20):
        got += chunk
    assert bytes(got) == payload
    pump.join(30)
    writer.join(30)
    assert not pump.is_alive() and not writer.is_alive()
    for s in (ours, theirs):
        s.close()
    os.close(r)
