"""The agent's direct streams (issue 19) without SLURM: a real agent, the real client.

``broker.direct.run`` runs in a child process (it uses fds 0, 1 and 2 as the SSH channel
would be); the agent listens on 127.0.0.1 with its key in a file of the test's.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys

import pytest

from broker import direct

from .test_sessionagent import SOURCE, TIMEOUT, make_agent  # noqa: F401  (fixture)

REPO = SOURCE.parents[2]


def run_direct(agent, argv: list[str], data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    status = agent.status_file()
    code = ("import sys; from broker import direct; "
            f"sys.exit(direct.run('127.0.0.1', {status['port']}, {str(agent.key)!r}, {argv!r}))")
    return subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=TIMEOUT,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture
def streaming(make_agent, tmp_path):
    key = tmp_path / "session.agent.key"
    agent = make_agent(listen="127.0.0.1", key=key)
    agent.key = key
    return agent


def test_stdout_stderr_and_status_pass_through_binary_safe(streaming):
    payload = os.urandom(8 << 20)
    out = run_direct(streaming, ["sh", "-c", "sha256sum; printf 'to-stderr' >&2; exit 7"], payload)
    assert out.returncode == 7
    assert out.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()
    assert out.stderr == b"to-stderr"
    started, exited = streaming.wait_event("command_started"), streaming.wait_event("command_exited")
    assert (len(started), exited[0]["status"]) == (1, 7)


def test_a_download_is_byte_identical(streaming, tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(16 << 20))
    out = run_direct(streaming, ["cat", str(blob)])
    assert out.returncode == 0 and out.stdout == blob.read_bytes()


def test_a_socketpair_for_stdin_and_stdout_carries_a_conversation_both_ways(streaming):
    """sshd built without pipes gives the command one socketpair as fds 0 and 1: no splice, so
    read/write, in the same loop as the other direction. A request/reply exchange (as sftp's)
    must go on to the end, byte-exact, with nothing waiting in a read that blocks the other way."""
    status = streaming.status_file()
    code = ("import sys; from broker import direct; "
            f"sys.exit(direct.run('127.0.0.1', {status['port']}, {str(streaming.key)!r}, ['cat']))")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=theirs, stdout=theirs, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        theirs.close()
        ours.settimeout(TIMEOUT)
        try:
            for size in (1, 100, 70000, 5, 1 << 20):
                message = os.urandom(size)
                ours.sendall(message)
                echoed = b""
                while len(echoed) < size:
                    echoed += ours.recv(1 << 20)
                assert echoed == message
            ours.shutdown(socket.SHUT_WR)
            assert proc.wait(TIMEOUT) == 0
        finally:
            proc.kill()
            proc.wait()


def test_the_key_file_is_the_users_alone(streaming):
    assert oct(os.stat(streaming.key).st_mode & 0o777) == "0o600"


def test_a_client_without_the_key_is_refused_before_anything_runs(streaming):
    port = streaming.status_file()["port"]
    # The real client with a wrong key: the agent's proof does not verify, so it stops first.
    with pytest.raises(direct.StreamError, match="not this session's agent"):
        direct.open_stream("127.0.0.1", port, os.urandom(32), {"op": "exec", "argv": ["touch", "/tmp/x"]})
    # A client that sends a proof anyway (it cannot make a right one) and then a request.
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(direct.MAGIC + os.urandom(direct.NONCE))
        assert len(direct._recv_exactly(sock, direct.NONCE + 32)) == direct.NONCE + 32
        sock.sendall(os.urandom(32))  # a request would never be read: the agent closes first
        assert sock.recv(100) == b""  # closed without a word
    refused = streaming.wait_event("stream_refused")
    assert refused[0]["why"] == "handshake: wrong session key"
    assert not streaming.events("command_started")


def test_a_listener_that_cannot_prove_the_key_gets_nothing():
    """A fake agent (someone else on the port) answers with bytes of its own: the client stops
    before it sends its request or any data."""
    server = socket.create_server(("127.0.0.1", 0))
    received = bytearray()
    try:
        port = server.getsockname()[1]
        import threading

        def fake() -> None:
            conn, _ = server.accept()
            received.extend(conn.recv(36))
            conn.sendall(os.urandom(64))
            conn.settimeout(2)
            try:
                while chunk := conn.recv(65536):
                    received.extend(chunk)
            except OSError:
                pass
            conn.close()

        thread = threading.Thread(target=fake)
        thread.start()
        with pytest.raises(direct.StreamError, match="not this session's agent"):
            direct.open_stream("127.0.0.1", port, os.urandom(32), {"op": "exec", "argv": ["secret-argv"]})
        thread.join(TIMEOUT)
    finally:
        server.close()
    assert len(received) == 36 and b"secret-argv" not in received  # magic and nonce only


def test_the_status_counts_running_commands(streaming):
    status = streaming.status_file()
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys; from broker import direct; "
                             f"sys.exit(direct.run('127.0.0.1', {status['port']}, {str(streaming.key)!r}, "
                             "['sleep', '30']))"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdin=subprocess.DEVNULL)
    try:
        streaming.wait_event("command_started")
        from tests.waiting import wait_for

        wait_for(lambda: streaming.status_file().get("commands") == 1, TIMEOUT, "the status to count the command")
        proc.kill()  # the client goes away (sshd hung up): the agent hangs the command up
        hung = streaming.wait_event("command_hangup")
        exited = streaming.wait_event("command_exited")
        assert hung[0]["pid"] == exited[0]["pid"] and exited[0]["status"] == 128 + 1
        wait_for(lambda: streaming.status_file().get("commands") == 0, TIMEOUT, "the count to drop")
    finally:
        proc.kill()
        proc.wait()
