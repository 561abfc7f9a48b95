"""Hostile input against the live daemon, from an ordinary user's connection.

Random frames, random JSON requests (every op, hostile values in every field) and
hostile commands for a ready session, each on a new connection from ``sbalice``.
The daemon answers one error naming a field, or closes; it never dies (same pid,
``ping`` answers afterwards), never runs a payload (the canary file never appears)
and an ``ensure`` with a command returns it as exactly one argv element after ``-c``.
The allowed projects are fixed to ``fuzzok`` so no generated value submits a job.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from broker import protocol as p
from broker.client import Client
from tests.integration.conftest import ensure_as

from .conftest import ALICE, SOCKET, BrokerProcess, peer_argv, reset_state

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

CANARY_DIR = Path(tempfile.mkdtemp(prefix="sbfault-sock-canary-"))
os.chmod(CANARY_DIR, 0o777)
CANARY = CANARY_DIR / "CANARY"
PAYLOADS = [f";touch {CANARY}", f"$(touch {CANARY})", f"`touch {CANARY}`", f"\ntouch {CANARY}\n",
            f"|touch {CANARY}", f"&& touch {CANARY}", f"' ; touch {CANARY} ; '", f'"; touch {CANARY}; "']
FRAGMENTS = ["'", '"', "\\", "$", "(", ")", "-", "--", "..", "/", ":", ",", " ", "\n", "\0", "é", "\ud7ff",
             "fuzz", "sbbob", "sbalice/", "/default", "a" * 300, "\u202e", "%n", "{user}"]
hostile = st.lists(st.one_of(st.sampled_from(PAYLOADS), st.sampled_from(FRAGMENTS), st.text(max_size=6)),
                   max_size=6).map("".join)
json_values = st.one_of(hostile, st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=False), st.lists(hostile, max_size=3),
                        st.dictionaries(hostile, hostile, max_size=2))
FIELDS = ["v", "op", "project", "session", "command", "tty", "term", "mode", "rows", "cols", "reason",
          "offset", "since", "limit", "user", "uid", "admin"]
OPS = sorted(p.OPS) + ["", "ENSURE", "shutdown", "exec", "../ping"]


def request_strategy():
    def build(op, v, fields):
        message = {"v": v, "op": op, **fields}
        # never the real session's own refs: attach/kill on it would act (that is allowed)
        for key in ("project", "session"):
            if isinstance(message.get(key), str) and "fuzzok" in message[key]:
                message[key] = message[key].replace("fuzzok", "fuzz")
        if op in ("ensure", "attach", "kill") and "project" not in message and "session" not in message:
            message["project"] = "notallowed"
        return message
    return st.builds(build, st.sampled_from(OPS), st.one_of(st.just(1), json_values),
                     st.dictionaries(st.sampled_from(FIELDS[2:]), json_values, max_size=6))


def frame_strategy():
    return st.one_of(
        st.binary(max_size=64),
        st.tuples(st.sampled_from([b"J", b"O", b"I", b"X", b"j", b"\0", b"\xff"]), st.integers(0, 2**32 - 1),
                  st.binary(max_size=64)).map(lambda t: p.HEADER.pack(t[0], t[1]) + t[2]),
        st.binary(max_size=200).map(lambda b: p.HEADER.pack(b"J", len(b)) + b),
        request_strategy().map(lambda m: json.dumps(m).encode()).map(lambda b: p.HEADER.pack(b"J", len(b)) + b),
        # a valid request followed by garbage / a second frame
        request_strategy().map(lambda m: p.encode_json({"v": 1, "op": "ping"}) + json.dumps(m).encode()),
    )


class Peer:
    def __init__(self, user: str) -> None:
        self.proc = subprocess.Popen(peer_argv(user, "batch", "-"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd="/")
        self.count = 0

    def send(self, raw: bytes) -> dict:
        self.count += 1
        self.proc.stdin.write(json.dumps({"raw": base64.b64encode(raw).decode()}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "peer died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def fuzz_broker(cluster):
    reset_state()
    proc = BrokerProcess(container_projects=["fuzzok"])
    proc.start()
    session = ensure_as(ALICE, "fuzzok")
    assert session["type"] == "result", session
    peer = Peer(ALICE)
    yield proc, peer, session["session"]
    peer.close()
    proc.stop()
    reset_state()


def check_reply(reply: dict) -> None:
    assert "error" not in reply and "bad_frame_from_daemon" not in reply, reply
    assert reply["closed"], reply
    for frame in reply["frames"]:
        assert frame.get("type") in ("error", "result", "progress"), frame
        if frame["type"] == "error":
            assert isinstance(frame.get("field"), str) and frame["field"], frame
            assert isinstance(frame.get("message"), str) and frame["message"], frame
    assert not CANARY.exists()


def alive(proc: BrokerProcess) -> None:
    assert proc.proc.poll() is None, "the daemon died"
    with Client(str(SOCKET), timeout=5) as c:
        assert c.request("ping")["type"] == "result"


SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)


@settings(max_examples=1200, **SETTINGS)
@given(raw=frame_strategy())
def test_random_frames(fuzz_broker, raw):
    proc, peer, _ = fuzz_broker
    check_reply(peer.send(raw))
    if peer.count % 200 == 0:
        alive(proc)


@settings(max_examples=1200, **SETTINGS)
@given(message=request_strategy())
def test_random_requests(fuzz_broker, message):
    proc, peer, session = fuzz_broker
    reply = peer.send(p.encode_json(message))
    check_reply(reply)
    frames = reply["frames"]
    assert frames, f"no reply to {message}"
    last = frames[-1]
    if message["v"] != 1 or message["op"] not in p.OPS:
        assert last["type"] == "error" and last["field"] in ("v", "op"), (message, last)
    if last["type"] == "result" and message["op"] in ("ensure", "show", "kill", "logs", "attach"):
        raise AssertionError(f"{message} acted on a session: {last}")
    if last["type"] == "result" and message["op"] == "list":
        assert all(s["user"] == ALICE for s in last["sessions"])
    if peer.count % 200 == 0:
        alive(proc)


@settings(max_examples=300, **SETTINGS)
@given(command=st.one_of(hostile, st.text(max_size=40)), tty=st.booleans(), term=hostile)
def test_hostile_commands_stay_one_argv_element(fuzz_broker, command, tty, term):
    proc, peer, session = fuzz_broker
    reply = peer.send(p.encode_json({"v": 1, "op": "ensure", "project": "fuzzok", "command": command,
                                     "tty": tty, "term": term[:64]}))
    check_reply(reply)
    last = reply["frames"][-1]
    if "\0" in command:
        assert last["type"] == "error" and last["field"] == "command", last
        return
    assert last["type"] == "result", last
    assert last["session"]["id"] == session["id"]
    # With a terminal: srun --pty; without: the argv the session agent runs over a direct stream.
    argv = last["exec"]["argv"] if tty else last["direct"]["argv"]
    assert ("exec" in last) is tty and ("direct" in last) is not tty, last
    if command.split()[:1] in (["internal-sftp"], ["/usr/lib/openssh/sftp-server"]):
        return
    assert argv[-3:] == ["/bin/bash", "-c", command]
    assert argv[:2] == (["srun", "--overlap"] if tty else ["apptainer", "exec"])


def test_daemon_survived_and_nothing_ran(fuzz_broker):
    proc, peer, session = fuzz_broker
    alive(proc)
    assert not CANARY.exists()
    again = ensure_as(ALICE, "fuzzok")
    assert again["session"]["id"] == session["id"] and again["session"]["state"] == "ready"
