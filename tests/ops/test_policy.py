"""Idle culling and walltime warnings on the real cluster, with short limits.

Idle culling is the broker's (audit ``idle_warning``, then ``kill``). Walltime warnings are
the session agent's since issue 15 (the shells live in the allocation): the agent reads its
job's end from ``squeue`` itself, writes the warning into the attached terminals and logs a
``walltime_warning`` JSON line to the session's job log (``sbroker logs``).
"""

from __future__ import annotations

import json
import re

import pexpect
import pytest

from tests.cluster import config as tb
from tests.integration.conftest import ALICE, BOB, ensure_as, jobs_of, sbroker, sbroker_json

from .conftest import attach, audit_entries, instances_of, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

#: The session's SLURM time limit, in seconds.
LIMIT = 120
#: GRACE leaves ``show`` seconds to see the warned session before the idle end.
IDLE, GRACE, MARK = 5, 6, 90
WARNING = re.compile(rb"allocation ends in (\d+) seconds \(walltime\)")


@pytest.fixture(scope="module")
def policy(start_broker):
    """alice: nobody attached (must be culled); bob: attached from the start to the job's end (must not be)."""
    start_broker(slurm_time_limit=f"0:{LIMIT // 60:02d}:{LIMIT % 60:02d}", timeouts_idle=IDLE,
                 timeouts_idle_grace=GRACE, timeouts_walltime_warnings=[1800, MARK])
    alice, bob = ensure_as(ALICE, "idle"), ensure_as(BOB, "busy")
    assert alice["type"] == "result" and bob["type"] == "result", (alice, bob)
    child = attach(BOB, bob["session"]["id"])
    yield {"alice": alice["session"], "bob": bob["session"], "child": child}
    if child.isalive():
        child.close(force=True)


def _events(kind: str, session_id: str) -> list[dict]:
    return [e for e in audit_entries() if e["event"] == kind and e.get("session") == session_id]


def _agent_log(session_id: str, kind: str) -> list[dict]:
    """The agent's JSON lines of ``kind`` in the session's job log, as an administrator reads it."""
    lines = sbroker(tb.ADMIN, "logs", session_id).stdout.splitlines()
    records = [json.loads(line) for line in lines if line.startswith('{"timestamp"')]
    return [r for r in records if r.get("logger") == "sbroker.agent" and r["event"] == kind]


def test_idle_session_is_warned_then_ended(policy):
    alice = policy["alice"]
    warned = wait_for(lambda: _events("idle_warning", alice["id"]), IDLE + 10, "the idle warning")
    assert warned[0]["limit"] == IDLE and warned[0]["ends_in"] == GRACE
    shown = sbroker_json(tb.ADMIN, "show", alice["id"])   # within the GRACE seconds after the warning
    assert shown["state"] == "ready" and shown["idle_warned"] is True
    assert 0 < shown["idle_ends_in"] <= GRACE
    kill = wait_for(lambda: _events("kill", alice["id"]), GRACE + 10, "the idle end")
    assert kill[0]["by"] == "sbroker" and kill[0]["reason"].startswith("idle for")
    assert kill[0]["ts"] - warned[0]["ts"] >= GRACE - 0.5
    wait_for(lambda: not jobs_of(ALICE), 30, "alice's job to be cancelled")
    wait_for(lambda: alice["instance"] not in instances_of(ALICE), 30, "alice's instance to stop")
    ended = wait_for(lambda: _events("session_ended", alice["id"]), 20, "session_ended")
    assert "idle" in ended[0]["reason"]


def test_attached_session_is_not_culled_and_gets_walltime_warning(policy):
    """bob stays attached from his session's start until SLURM ends it at its time limit.

    The walltime warning is the agent's (see the module docstring): asserted in bob's terminal
    and in the agent's ``walltime_warning`` lines of the job log. The broker's part: an
    attached session is never idle-culled (no ``idle_warning``/``kill`` in its audit log)."""
    bob, child = policy["bob"], policy["child"]
    # Time left passes MARK (LIMIT - MARK) s after the job started; the agent looks every 5 s.
    marked = wait_for(lambda: [w for w in _agent_log(bob["id"], "walltime_warning") if w["mark"] == MARK],
                      LIMIT, f"the agent's walltime warning for the {MARK} s mark")
    assert marked[0]["seconds_left"] <= MARK and marked[0]["delivered"] == 1
    # The agent wrote the text to bob's terminal before it logged the line.
    child.expect(rb"allocation ends in %d seconds \(walltime\)" % marked[0]["seconds_left"], timeout=10)
    shown = sbroker_json(tb.ADMIN, "show", bob["id"])
    assert shown["state"] == "ready" and (shown["attachers"], shown["shells"]) == (1, 1)
    assert shown["idle_warned"] is False
    # Wait for the session's end: SLURM ends the job at its limit (the broker's scancel would
    # make it CANCELLED); only then is "never culled" and "each mark once" a whole-life fact.
    wait_for(lambda: [j["state"] for j in jobs_of(BOB, states="all") if j["job_id"] == bob["job_id"]]
             == ["TIMEOUT"], LIMIT + 30, "bob's job to reach its time limit")
    child.expect(pexpect.EOF, timeout=30)   # the agent hung up bob's shell as the job ended
    wait_for(lambda: _agent_log(bob["id"], "agent_stopping"), 30, "the agent's last lines in the job log")
    ended = wait_for(lambda: _events("session_ended", bob["id"]), 30, "bob's session_ended")
    assert "idle" not in ended[0]["reason"]
    assert not _events("idle_warning", bob["id"]) and not _events("kill", bob["id"])
    # Each mark once, in the job log and in bob's terminal (the 1800 s mark had passed when
    # the agent started; nobody was attached then, so bob's attach showed it).
    warnings = _agent_log(bob["id"], "walltime_warning")
    assert [w["mark"] for w in warnings] == [1800, MARK], warnings
    shown_in_terminal = [int(n) for n in WARNING.findall(child.logfile_read.getvalue())]
    assert shown_in_terminal == [w["seconds_left"] for w in warnings]
