"""Issue 14 item 4: per-user limits, each refused with one line naming the config key.

A daemon with tiny limits (connections 3, sessions 1, shells 1, detached shells 1): sbbob
hits each; sbalice, at the same time, is never refused and her ``ping`` answers.
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from broker.config import parse
from broker.limits import new_session_refusal
from broker.session import Session, State
from tests.cluster import config as tb
from tests.integration import daemon as bed
from tests.integration.conftest import ensure_as
from tests.ops.conftest import attach

from ._peer import attach_once, broker_with

ALICE, BOB = tb.USERS
LIMITS = "[limits]\nconnections_per_user = 3\nsessions_per_user = 1\nshells_per_user = 1\n" \
         "detached_shells_per_user = 1\n"


@pytest.fixture(scope="module")
def limited(cluster):
    proc = broker_with(LIMITS)
    yield proc
    proc.stop()
    bed.reset_state()


HOLD = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[3])
from broker import protocol as p
held = [socket.socket(socket.AF_UNIX) for _ in range(int(sys.argv[2]))]
for s in held:
    s.connect(sys.argv[1])
extra = socket.socket(socket.AF_UNIX)
extra.connect(sys.argv[1])
extra.sendall(p.encode_json({"v": p.VERSION, "op": "ping"}))
print(extra.recv(65536)[p.HEADER.size:].decode(), flush=True)
"""


@pytest.mark.cluster
def test_each_limit_refuses_with_one_line_and_others_are_untouched(limited):
    held = subprocess.run(["runuser", "-u", BOB, "--", "/usr/bin/python3", "-c", HOLD, str(bed.SOCKET), "3",
                           str(tb.REPO)], capture_output=True, text=True, timeout=60, cwd="/")
    assert held.returncode == 0, held.stderr
    refusal = json.loads(held.stdout)
    assert (refusal["type"], refusal["code"], refusal["field"]) == ("error", "limit", "limits.connections_per_user"), held
    assert refusal["message"].startswith("limits.connections_per_user: at most 3 connections")

    first = ensure_as(BOB, "default")
    assert first["type"] == "result", first
    second = ensure_as(BOB, "second")
    assert (second["type"], second["code"]) == ("error", "limit"), second
    assert second["message"].startswith("limits.sessions_per_user: you have 1 live sessions")
    assert ensure_as(ALICE, "default")["type"] == "result"

    session = first["session"]["id"]
    shell = attach(BOB, session)  # his one shell, attached
    try:
        refused = attach_once(BOB, {"session": session, "mode": "write", "rows": 24, "cols": 80})
        assert (refused["type"], refused["code"]) == ("error", "limit"), refused
        assert refused["message"].startswith("limits.shells_per_user: you have 1 shells open")
    finally:
        shell.kill(signal.SIGKILL)
        shell.close(force=True)


def test_pending_limit_counts_sessions_still_waiting_for_slurm():
    config = parse({"container": {"image": "/i.sif"}, "limits": {"pending_per_user": 2}})
    sessions = []
    for project, state in (("a", State.PENDING), ("b", State.SUBMITTED), ("c", State.READY)):
        s = Session(user="bob", uid=1001, project=project)
        s.state = state
        sessions.append(s)
    refusal = new_session_refusal(config, "bob", sessions)
    assert refusal is not None and refusal.startswith("limits.pending_per_user: 2 of your sessions are still")
    assert new_session_refusal(config, "alice", sessions) is None

