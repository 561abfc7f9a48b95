"""The login client's side of a direct stream, without a cluster: its handshake crypto (a
hand-written HMAC over the built-in SHA-256, so that no ``ssh host cmd`` loads OpenSSL) and
what the direct path imports."""

from __future__ import annotations

import hashlib
import hmac
import socket
import subprocess
import sys

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
