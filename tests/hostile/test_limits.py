"""Issue 14 item 4: per-user limits, each refused with one line naming the config key.

A daemon with tiny limits (connections 3, sessions 1, shells 1, detached shells 1): sbbob
hits each; sbalice, at the same time, is never refused and her ``ping`` answers.

Where each rule lives: connections and sessions are counted by the broker
(``broker/server.py``, ``broker/limits.py``) and refused in its ``error`` reply. Shells
live in the session's agent since issue 15 (``broker/agent/sessionagent.py``, started with
``--max-shells`` = ``limits.shells_per_user``), which counts them *per session* and refuses
a new one with one line through the owner's own ``srun`` (exit status 1); it logs
``limit_refused`` in the session's job log. Detached shells: ``test_limits_detached``.
"""

from __future__ import annotations

import json
import subprocess

import pexpect
import pytest

from broker.config import parse
from broker.limits import new_session_refusal
from broker.session import Session, State
from tests.cluster import config as tb
from tests.integration import daemon as bed
from tests.integration.conftest import ensure_as

from ._peer import agent_events, answers, broker_with, close, session_files, terminal, wait_event

ALICE, BOB = tb.USERS
LIMITS = "[limits]\nconnections_per_user = 3\nsessions_per_user = 1\nshells_per_user = 1\n" \
         "detached_shells_per_user = 1\n"
SHELLS_REFUSAL = ("sbroker: limits.shells_per_user: at most 1 shells in a session; exit one (or reattach a "
                  "detached one) and retry")


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
    log, _ = session_files(BOB, session)
    shell = terminal(BOB, "attach", session)  # his one shell, attached
    try:
        answers(shell, "one")
        shell.send(b"export LIMIT_MARK=bob-$((6*7))\r")
        refused = terminal(BOB, "attach", session)  # a second terminal, as a second ssh login would be
        refused.expect(pexpect.EOF)
        refused.wait()
        assert refused.exitstatus == 1
        assert refused.before.decode().splitlines() == [SHELLS_REFUSAL], refused.before
        refusal = wait_event(log, "limit_refused")[-1]
        assert (refusal["rule"], refusal["limit"]) == ("shells", 1), refusal
        # Untouched: his own shell, and alice, who opens a shell in her session meanwhile.
        answers(shell, "still")
        hers = ensure_as(ALICE, "default")["session"]["id"]
        theirs = terminal(ALICE, "attach", hers)
        answers(theirs, "alice")
        close(theirs)
        hers_log = session_files(ALICE, hers)[0]
        assert [e["event"] for e in agent_events(hers_log) if e["event"].startswith("limit")] == []
        # The line's advice holds: once his shell is detached, the next login reattaches it.
        close(shell)
        wait_event(log, "detach", shell=1)
        shell = terminal(BOB, "attach", session)
        shell.send(b"echo mark=$LIMIT_MARK\r")
        shell.expect(rb"mark=bob-42\r")
        assert [e["shell"] for e in wait_event(log, "reattach")] == [1]
        assert len(wait_event(log, "limit_refused")) == 1  # once, for the one refused terminal
    finally:
        close(shell)


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

