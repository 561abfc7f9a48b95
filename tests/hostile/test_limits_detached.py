"""Issue 14 item 4, detached shells: beyond ``limits.detached_shells_per_user`` the oldest
detached shell is ended. (Its own module: ``test_limits``' module-scoped daemon has other limits.)

Where the rule lives: since issue 15 the shells are the session agent's
(``broker/agent/sessionagent.py``, ``Agent._enforce_detached_limit``), started with
``--max-detached`` = ``limits.detached_shells_per_user`` and ``--max-shells`` =
``limits.shells_per_user``; both count the shells of *one session*. When a writer leaves
and more shells are detached than allowed, the agent hangs up the oldest detached one and
logs ``limit_detached`` in the session's job log; the shells of the user's other sessions
are other agents' and are never counted or touched.
"""

from __future__ import annotations

import pytest

from tests.cluster import config as tb
from tests.integration import daemon as bed
from tests.integration.conftest import ensure_as

from ._peer import agent_events, answers, broker_with, close, session_files, terminal, wait_event

BOB = tb.USERS[1]


@pytest.mark.cluster
def test_detached_shells_beyond_the_limit_end_oldest_first(cluster):
    """``detached_shells_per_user = 1``, ``shells_per_user = 2``: bob drops a shell in p2, then
    opens two shells in p1 and drops both; p1's older detached shell is ended, its newer one is
    kept for him to reattach, and p2's detached shell (the oldest of all of bob's) is untouched."""
    # The detach grace is far longer than the test: only the limit may end a detached shell here.
    proc = broker_with("[limits]\ndetached_shells_per_user = 1\nshells_per_user = 2\n",
                       timeouts_detach_grace=3600)
    try:
        ids = {p: ensure_as(BOB, p)["session"]["id"] for p in ("p1", "p2")}
        logs = {p: session_files(BOB, ids[p])[0] for p in ids}

        other = terminal(BOB, "attach", ids["p2"])  # p2: one shell, dropped (detached, kept)
        answers(other, "p2")
        other.send(b"export MARK=p2-$((6*7))\r")
        answers(other, "p2-marked")  # the shell has read the export before the terminal goes
        close(other)
        wait_event(logs["p2"], "detach", shell=1)

        older = terminal(BOB, "attach", ids["p1"])  # p1: two shells, at its shells limit; p2's
        answers(older, "older")                     # detached one is not p1's to count
        older.send(b"export MARK=older-$((6*7))\r")
        newer = terminal(BOB, "attach", ids["p1"])
        answers(newer, "newer")
        newer.send(b"export MARK=newer-$((6*7))\r")
        answers(newer, "newer-marked")
        answers(older, "older-marked")
        close(older)
        wait_event(logs["p1"], "detach", shell=1)   # one detached in p1: within the limit
        close(newer)
        wait_event(logs["p1"], "detach", shell=2)   # two: the older one goes
        ended = wait_event(logs["p1"], "limit_detached")
        assert [(e["shell"], e["limit"]) for e in ended] == [(1, 1)], ended
        wait_event(logs["p1"], "shell_exited", shell=1)  # hung up; its processes gone with it
        assert [e for e in agent_events(logs["p1"]) if e["event"] in ("limit_refused", "shell_exited")
                and e.get("shell") != 1] == []

        # p1: the next login reattaches the newer shell, the one after gets a new shell.
        back = terminal(BOB, "attach", ids["p1"])
        back.send(b"echo mark=$MARK\r")
        back.expect(rb"mark=newer-42\r")
        fresh = terminal(BOB, "attach", ids["p1"])
        fresh.send(b"echo mark=${MARK:-none}\r")
        fresh.expect(rb"mark=none\r")
        assert [e["shell"] for e in wait_event(logs["p1"], "reattach")] == [2]
        assert [e["shell"] for e in wait_event(logs["p1"], "attach", count=3)] == [1, 2, 3]
        close(back)
        close(fresh)

        # p2: never counted with p1's shells, nothing ended; its shell is still there to reattach.
        kept = terminal(BOB, "attach", ids["p2"])
        kept.send(b"echo mark=$MARK\r")
        kept.expect(rb"mark=p2-42\r")
        assert [e["shell"] for e in wait_event(logs["p2"], "reattach")] == [1]
        assert [e["event"] for e in agent_events(logs["p2"]) if e["event"].startswith(("limit", "shell_e"))] == []
        close(kept)
    finally:
        proc.stop()
        bed.reset_state()
