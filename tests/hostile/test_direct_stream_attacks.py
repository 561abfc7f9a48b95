"""Another user against a session's direct-stream port (issue 19).

The session agent listens on TCP on the compute node (``transfer.listen``, every interface
by default): any local user of any node can reach it. Here ``sbbob`` attacks ``sbalice``'s
agent (its port read as root from her status file): he cannot read her session key; without
it a proof is refused and nothing runs or reaches him; garbage, oversized and slow first
bytes are dropped within the handshake timeout while her transfer goes on and a new command
of hers runs at once; a command's stderr pairing cannot be taken over with a guessed or
replayed token. And the
other way round: a listener that is not the agent (someone else's program on a port the
client was told about) cannot make ``sbroker login`` send it anything, since it cannot
prove it holds the key.

Bob's side runs as ``sbbob`` (``runuser``) with the system python and :data:`BOB_ATTACKS`,
which prints one JSON report per line.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import secrets
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker import direct
from broker.agent import sessionagent
from tests.cluster import config as tb
from tests.cluster import harness
from tests.integration.conftest import broker, ensure_as, wait_node  # noqa: F401 (fixture)
from tests.waiting import wait_for

from ._peer import agent_events, agent_status, session_files

ALICE, BOB = tb.USERS
MIB = 1024 * 1024
HANDSHAKE_TIMEOUT = sessionagent.HANDSHAKE_TIMEOUT

# ----------------------------------------------------------------------------- bob's program

BOB_ATTACKS = r'''
import json, os, socket, sys, threading, time
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
MAGIC = b"SBA1"

def report(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()

def recv_all(sock, started):
    """Everything until the agent closes; how it closed and when (seconds after connecting)."""
    got = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return got, "reset", time.monotonic() - started
        except socket.timeout:
            return got, "still-open", time.monotonic() - started
        if not chunk:
            return got, "eof", time.monotonic() - started
        got += chunk

def recv_exactly(sock, n):
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got

def connect():
    sock = socket.create_connection((host, port), timeout=60)
    return sock, time.monotonic()

if mode in ("wrong-proof-exec", "wrong-proof-stderr"):
    # A full handshake with a proof made without the key, then a request.
    sock, t0 = connect()
    sock.sendall(MAGIC + os.urandom(32))
    answer = recv_exactly(sock, 64)
    if mode == "wrong-proof-exec":
        request = {"op": "exec", "argv": ["/bin/sh", "-c", "echo BOB-RAN; touch /tmp/bob-was-here"]}
    else:
        request = {"op": "stderr", "token": sys.argv[4]}
    try:
        sock.sendall(os.urandom(32) + json.dumps(request).encode() + b"\n")
    except OSError:
        pass
    rest, how, elapsed = recv_all(sock, t0)
    report(mode=mode, answer=len(answer), rest=rest.hex(), how=how, elapsed=elapsed)

elif mode == "flood":
    # Garbage, oversized and slow first bytes, all at once; "ready" once every connection is open.
    slow, silent = int(sys.argv[4]), int(sys.argv[5])
    results, threads = [], []

    def garbage():
        sock, t0 = connect()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: agent\r\nUser-Agent: bob\r\n\r\n")
        return sock, t0, None

    def oversized():
        sock, t0 = connect()
        def push():
            try:
                sock.sendall(b"\xff" * (8 << 20))  # 8 MiB of first bytes
            except OSError:
                pass
        threading.Thread(target=push, daemon=True).start()
        return sock, t0, None

    def loris():
        sock, t0 = connect()
        stop = threading.Event()
        def drip():
            for byte in (MAGIC + os.urandom(32))[:20]:   # 20 of its 36 bytes in 5 s, then nothing
                if stop.wait(0.25):
                    return
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    return
        threading.Thread(target=drip, daemon=True).start()
        return sock, t0, stop

    def quiet():
        return (*connect(), None)

    kinds = [("garbage", garbage), ("oversized", oversized)] + [("slow", loris)] * slow + [("silent", quiet)] * silent
    opened = [(kind, *make()) for kind, make in kinds]
    report(ready=len(opened))

    def watch(kind, sock, t0, stop):
        got, how, elapsed = recv_all(sock, t0)
        if stop is not None:
            stop.set()
        results.append({"kind": kind, "got": len(got), "how": how, "elapsed": elapsed})

    for item in opened:
        t = threading.Thread(target=watch, args=item)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    report(results=results)

'''


def bob(*args: str, timeout: float = 90) -> list[dict]:
    """Run :data:`BOB_ATTACKS` as sbbob; its JSON reports."""
    r = subprocess.run(["runuser", "-u", BOB, "--", "/usr/bin/python3", "-I", "-c", BOB_ATTACKS, *args],
                       capture_output=True, text=True, timeout=timeout, cwd="/")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


# ----------------------------------------------------------------------------- alice's session

@dataclass
class Agent:
    """Alice's session agent: where it listens, its key file and its log (the job log)."""

    node: str
    instance: str
    log: Path
    host: str
    port: int

    @property
    def key_path(self) -> Path:
        return self.log.with_name(f"{self.instance}.agent.key")

    def status(self) -> dict:
        return agent_status(self.log.with_name(f"{self.instance}.agent.json"))

    def key(self) -> bytes:
        return direct.read_key(str(self.key_path))

    def offset(self) -> int:
        """How many agent lines the job log holds now: ``since`` for :meth:`events`."""
        return len(agent_events(self.log))

    def events(self, since: int, *names: str) -> list[dict]:
        """The agent's lines named one of ``names`` after the first ``since``."""
        return [e for e in agent_events(self.log)[since:] if e["event"] in names]

    def tail(self, since: int, lines: int = 15) -> list[dict]:
        """The agent's last lines after the first ``since``, for a failure message."""
        return agent_events(self.log)[since:][-lines:]


@pytest.fixture(scope="module")
def agent(broker) -> Agent:
    """Alice's default session with its agent listening (direct streams are on by default)."""
    session = ensure_as(ALICE, "default")["session"]
    node = wait_node(ALICE, session["id"])
    log, status = session_files(ALICE, session["id"])
    port = wait_for(lambda: agent_status(status).get("port") if status.exists() else 0, 20,
                    "the port in alice's agent status file")
    instance = status.name.removesuffix(".agent.json")
    return Agent(str(node), instance, log, tb.NODES[str(node)][0], int(port))


def alice_ssh(command: str, **kw) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["ssh", *tb.SSH_OPTS, f"{ALICE}@{tb.SSH_HOST}", command], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


# ----------------------------------------------------------------------------- 7a. the key

@pytest.mark.cluster
@pytest.mark.slow
def test_bob_cannot_read_alices_session_key(agent):
    info = agent.key_path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == pwd.getpwnam(ALICE).pw_uid
    assert len(agent.key()) == 32
    r = subprocess.run(["runuser", "-u", BOB, "--", "/usr/bin/python3", "-I", "-c",
                        "import sys; open(sys.argv[1], 'rb').read()", str(agent.key_path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "PermissionError" in r.stderr, r.stderr
    # Bob's own client with that path fails to read it too: one line, status 255, no connection.
    r = subprocess.run(["runuser", "-u", BOB, "--", str(tb.VENV / "bin" / "python3"), "-I", "-c",
                        "import sys; from broker import direct; "
                        "sys.exit(direct.run(sys.argv[1], int(sys.argv[2]), sys.argv[3], ['/bin/true']))",
                        agent.host, str(agent.port), str(agent.key_path)],
                       capture_output=True, text=True, timeout=30, cwd="/")
    assert r.returncode == 255
    assert r.stderr.startswith(f"sbroker: cannot read the session key {agent.key_path}: Permission denied"), r.stderr


# ----------------------------------------------------------------------------- 7b. no key, no command

@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.parametrize("op", ["exec", "stderr"])
def test_a_wrong_proof_is_refused_and_nothing_runs_or_reaches_bob(agent, op):
    since = agent.offset()
    args = [agent.host, str(agent.port), f"wrong-proof-{op}"] + ([secrets.token_hex(16)] if op == "stderr" else [])
    [report] = bob(*args)
    # Bob got the agent's nonce and proof (64 bytes), then the connection closed: nothing else.
    assert report["answer"] == 64
    assert report["rest"] == ""
    assert report["how"] != "still-open", report  # the agent closed it (FIN or reset: TCP's detail)...
    assert report["elapsed"] < HANDSHAKE_TIMEOUT, report  # ...at once, not timed out
    # The agent closed it after logging why; nothing started.
    assert [e["why"] for e in agent.events(since, "stream_refused")] == ["handshake: wrong session key"]
    assert agent.events(since, "command_started") == []
    assert agent.status()["commands"] == 0
    # The agent's commands run as alice on the node: bob's would have left its file there.
    probe = subprocess.run(harness.on_node(agent.node, "test", "-e", "/tmp/bob-was-here"), timeout=30)
    assert probe.returncode == 1


@pytest.mark.cluster
@pytest.mark.slow
def test_bobs_client_without_the_key_is_refused_before_sending_anything(agent):
    """The real client with a key of bob's own: the agent's proof does not match it, so the
    client stops there and hangs up; the agent sees no proof and drops the stream."""
    since = agent.offset()
    with pytest.raises(direct.StreamError, match="is not this session's agent"):
        direct.open_stream(agent.host, agent.port, secrets.token_bytes(32), {"op": "exec", "argv": ["/bin/true"]})
    dropped = wait_for(lambda: agent.events(since, "stream_dropped", "stream_refused"), 10,
                       "the agent's line about the abandoned handshake")
    assert [(e["event"], e["why"]) for e in dropped] == [("stream_dropped", "closed during the handshake")]
    assert agent.events(since, "command_started") == []


# ----------------------------------------------------------------------------- 7c. junk, floods

class Flood:
    """Bob's ``flood`` against the agent: one garbage and one oversized first message, ``slow``
    connections that drip part of a hello, ``silent`` ones that send nothing; every one is
    open when this is made. :meth:`results` waits until the agent has closed them all."""

    def __init__(self, agent: Agent, slow: int, silent: int) -> None:
        self.proc = subprocess.Popen(["runuser", "-u", BOB, "--", "/usr/bin/python3", "-I", "-c", BOB_ATTACKS,
                                      agent.host, str(agent.port), "flood", str(slow), str(silent)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
        ready = json.loads(self.proc.stdout.readline() or "{}")
        if ready != {"ready": 2 + slow + silent}:
            self.stop()
            raise AssertionError(f"bob's connections did not all open ({ready}): {self.proc.stderr.read()}")

    def results(self) -> dict[str, list[dict]]:
        """Per kind of connection: what bob received on each, how and when it was closed."""
        line = self.proc.stdout.readline()
        assert self.proc.wait(30) == 0, self.proc.stderr.read()
        by_kind: dict[str, list[dict]] = {}
        for result in json.loads(line)["results"]:
            by_kind.setdefault(result["kind"], []).append(result)
        return by_kind

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.cluster
@pytest.mark.slow
def test_garbage_oversized_and_slow_first_bytes_are_dropped_without_disturbing_alice(agent):
    slow, silent = 20, 20
    # Alice's transfer: sha256sum of a stream fed in small paced chunks for as long as bob attacks.
    feeding_done = threading.Event()
    sent = hashlib.sha256()
    sent_bytes = 0
    transfer = alice_ssh("sha256sum")

    def feed() -> None:
        nonlocal sent_bytes
        while not feeding_done.is_set() or sent_bytes < 8 * MIB:
            chunk = os.urandom(256 * 1024)
            transfer.stdin.write(chunk)
            transfer.stdin.flush()
            sent.update(chunk)
            sent_bytes += len(chunk)
            feeding_done.wait(0.05)
        transfer.stdin.close()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        wait_for(lambda: agent.status().get("commands") == 1, 30, "alice's transfer running in her agent")
        since = agent.offset()
        flood = Flood(agent, slow, silent)
        try:
            # While every one of bob's connections is open, a new command of alice's runs at once.
            t0 = time.monotonic()
            quick = alice_ssh("echo alive")
            out, err = quick.communicate(timeout=60)
            assert (quick.returncode, out, err) == (0, b"alive\n", b""), agent.tail(since)
            assert time.monotonic() - t0 < HANDSHAKE_TIMEOUT, "alice's command waited for bob's connections"
            by_kind = flood.results()
        finally:
            flood.stop()
        assert sorted((k, len(v)) for k, v in by_kind.items()) == [
            ("garbage", 1), ("oversized", 1), ("silent", silent), ("slow", slow)]
        for result in [r for results in by_kind.values() for r in results]:
            assert result["got"] == 0, result             # not even the agent's nonce: no valid hello
            assert result["how"] != "still-open", result  # the agent closed it (FIN or reset: TCP's detail)
        for result in by_kind["garbage"] + by_kind["oversized"]:
            assert result["elapsed"] < HANDSHAKE_TIMEOUT / 2, result  # at once: not a sbroker stream
        for result in by_kind["slow"] + by_kind["silent"]:
            assert HANDSHAKE_TIMEOUT - 1 < result["elapsed"] < HANDSHAKE_TIMEOUT + 3, result  # held to the timeout
        whys = [e["why"] for e in agent.events(since, "stream_dropped", "stream_refused")]
        assert sorted(whys) == sorted(["handshake: not a sbroker stream"] * 2 + ["TimeoutError"] * (slow + silent))
        # The only command that started meanwhile is alice's `echo alive`.
        assert len(agent.events(since, "command_started")) == 1
    finally:
        feeding_done.set()
        feeder.join(60)
    out, err = transfer.stdout.read(), transfer.stderr.read()  # its stdin is the feeder's, closed
    assert transfer.wait(60) == 0, err
    assert out.split()[0].decode() == sent.hexdigest()
    assert sent_bytes >= 8 * MIB


@pytest.mark.cluster
@pytest.mark.slow
def test_idle_connections_held_by_bob_do_not_lock_alice_out_of_new_commands(agent):
    """Bob holds 100 connections that never send a byte (each one lives until the handshake
    timeout, and he can renew them forever). Alice's running transfer goes on, and a command
    she starts meanwhile runs: holding connections open must not deny her the agent."""
    transfer = alice_ssh("cat > /dev/null; echo transfer-done")
    transfer.stdin.write(os.urandom(MIB))
    transfer.stdin.flush()
    wait_for(lambda: agent.status().get("commands") == 1, 30, "alice's transfer running in her agent")
    since = agent.offset()
    flood = Flood(agent, 0, 100)
    try:
        quick = alice_ssh("echo alive")
        out, err = quick.communicate(timeout=60)
        transfer.stdin.write(os.urandom(MIB))  # her transfer still takes data
        transfer.stdin.flush()
    finally:
        flood.stop()
        transfer.stdin.close()
    assert (quick.returncode, out, err) == (0, b"alive\n", b""), agent.tail(since)
    rest, err = transfer.stdout.read(), transfer.stderr.read()
    assert (transfer.wait(60), rest, err) == (0, b"transfer-done\n", b"")


# ----------------------------------------------------------------------------- 7d. the pairing

@pytest.mark.cluster
@pytest.mark.slow
def test_a_commands_stderr_stream_cannot_be_taken_over_by_a_guessed_or_reused_token(agent):
    """Even with the key (the strongest attacker), only the one pairing with the exec's own
    token gets the command's stderr and status; a guessed token, and the right token a second
    time, are closed without a byte. Without the key (bob), the request never gets that far."""
    key = agent.key()
    since = agent.offset()
    data, reply = direct.open_stream(agent.host, agent.port, key,
                                     {"op": "exec", "argv": ["/bin/sh", "-c", "cat; echo err-mark >&2; exit 5"]})
    token = reply["token"]
    try:
        guessed, _ = direct.open_stream(agent.host, agent.port, key, {"op": "stderr", "token": secrets.token_hex(16)})
        guessed.settimeout(HANDSHAKE_TIMEOUT + 5)
        assert guessed.recv(4096) == b""
        guessed.close()
        [bob_report] = bob(agent.host, str(agent.port), "wrong-proof-stderr", token)
        assert (bob_report["answer"], bob_report["rest"]) == (64, ""), bob_report

        control, _ = direct.open_stream(agent.host, agent.port, key, {"op": "stderr", "token": token})
        # Paired: the agent starts the command only then (the client gets no answer to wait for).
        wait_for(lambda: agent.events(since, "command_started"), 10,
                 lambda: f"the command to start once paired (agent: {agent.tail(since)})")
        again, _ = direct.open_stream(agent.host, agent.port, key, {"op": "stderr", "token": token})
        again.settimeout(HANDSHAKE_TIMEOUT + 5)
        assert again.recv(4096) == b""
        again.close()

        data.sendall(b"stdin for alice\n")
        data.shutdown(socket.SHUT_WR)
        data.settimeout(30)
        out = b""
        while chunk := data.recv(65536):
            out += chunk
        assert out == b"stdin for alice\n"
        control.settimeout(30)
        frames = b""
        while chunk := control.recv(65536):
            frames += chunk
        control.close()
    finally:
        data.close()
    assert frames == (sessionagent.encode(b"O", b"err-mark\n")
                      + sessionagent.encode_json({"type": "exit", "status": 5})), frames
    assert len(agent.events(since, "command_started")) == 1
    assert [e["why"] for e in agent.events(since, "stream_refused")] == ["handshake: wrong session key"]


# ----------------------------------------------------------------------------- 7e. a fake agent

class FakeListener:
    """A listener that is not the agent: it answers the hello with ``answer(hello)``, records
    every byte the client sends after it, and reports when the client closed."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.hello = b""
        self.after = b""
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(20)
            while len(self.hello) < 36:
                chunk = conn.recv(36 - len(self.hello))
                if not chunk:
                    break
                self.hello += chunk
            reply = self.answer(self.hello)
            if reply is None:  # hang up on the client
                self.closed.set()
                return
            conn.sendall(reply)
            try:
                while chunk := conn.recv(65536):
                    self.after += chunk
            except OSError:
                pass
        self.closed.set()

    def close(self) -> None:
        self.sock.close()


def _random_answer(hello: bytes) -> bytes:
    return os.urandom(64)


def _proof_with_another_key(hello: bytes) -> bytes:
    server_nonce = os.urandom(32)
    return server_nonce + direct._mac(os.urandom(32), b"server", hello[4:], server_nonce)


def _reflected_client_role(hello: bytes) -> bytes:
    """A listener that cannot compute the server proof sends something else it could know."""
    return hello[4:] + hashlib.sha256(hello).digest()


@pytest.mark.parametrize("answer", [_random_answer, _proof_with_another_key, _reflected_client_role],
                         ids=["random-bytes", "another-key", "reflected"])
def test_a_listener_without_the_key_gets_nothing_from_the_client(answer):
    fake = FakeListener(answer)
    try:
        key = secrets.token_bytes(32)
        request = {"op": "exec", "argv": ["/bin/sh", "-c", "cat secret-file"]}
        with pytest.raises(direct.StreamError, match=r"^the listener at 127\.0\.0\.1:\d+ is not this session's "
                                                     r"agent \(wrong key proof\)$"):
            direct.open_stream("127.0.0.1", fake.port, key, request)
        assert fake.closed.wait(10), "the client did not close the connection"
        assert fake.hello[:4] == b"SBA1" and len(fake.hello) == 36
        assert fake.after == b""  # no client proof, no request, no argv
    finally:
        fake.close()


def test_sbroker_login_against_a_fake_listener_fails_with_one_line_and_status_255(tmp_path, capfd):
    fake = FakeListener(_random_answer)
    key_file = tmp_path / "s.agent.key"
    key_file.write_text(secrets.token_bytes(32).hex() + "\n")
    try:
        status = direct.run("127.0.0.1", fake.port, str(key_file), ["/bin/sh", "-c", "cat secret-file"])
        assert fake.closed.wait(10)
    finally:
        fake.close()
    assert status == 255
    out, err = capfd.readouterr()
    assert out == ""
    assert err == (f"sbroker: the listener at 127.0.0.1:{fake.port} is not this session's agent "
                   "(wrong key proof)\n")
    assert fake.after == b""


def test_a_listener_that_closes_during_the_handshake_is_a_clear_error():
    fake = FakeListener(lambda hello: None)
    try:
        with pytest.raises(direct.StreamError, match="closed the connection during the handshake"):
            direct.open_stream("127.0.0.1", fake.port, secrets.token_bytes(32), {"op": "exec", "argv": ["true"]})
    finally:
        fake.close()
