"""The agent's spare shell (``--spare 1``): the next login's prompt is already there.

Real agent, real ptys and shells (no SLURM); see test_sessionagent.py for the harness. A
spare is started SPARE_DELAY after a login took a shell; the next new login gets it (its
prompt replayed), a dotfile edited since it started makes it be replaced, and it never
counts against ``--max-shells`` nor shows in the status.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.waiting import wait_for

from .test_sessionagent import TIMEOUT, make_agent, mark, shell_pid  # noqa: F401  (fixture)


def test_a_new_login_takes_the_spare_and_a_new_spare_follows(make_agent):
    agent = make_agent(spare=1)
    first = agent.attach()
    started = agent.wait_event("spare_started")
    second = agent.attach()  # the prompt is the spare's, replayed from its scrollback
    taken = agent.wait_event("spare_taken")
    assert taken[0]["shell"] == started[0]["shell"]
    assert shell_pid(second) == [e["pid"] for e in agent.events("shell_started")
                                 if e["shell"] == taken[0]["shell"]][0]
    mark(second, "spare-works")
    agent.wait_event("spare_started", count=2)  # the next one, for the login after
    status = wait_for(lambda: agent.status_file().get("writers") == 2 and agent.status_file(), TIMEOUT,
                      "two writers in the status file")
    assert status["shells"] == 2  # the new spare is not counted
    mark(first, "first-unaffected")


def test_a_dotfile_changed_since_the_spare_started_gets_a_fresh_shell(make_agent):
    agent = make_agent(spare=1)
    agent.attach()
    agent.wait_event("spare_started")
    bashrc = Path(agent.env["HOME"]) / ".bashrc"
    bashrc.write_text("export FROM_NEW_BASHRC=yes\n")
    os.utime(bashrc, None)
    second = agent.attach()
    hangups = agent.wait_event("hangup")
    assert [h["why"] for h in hangups] == ["spare shell out of date"]
    assert not agent.events("spare_taken")
    # The login got a shell started after the edit (the harness's bash reads no rc file, so
    # the proof is the start order: the stale spare's pid is not the login's).
    stale = [e["pid"] for e in agent.events("shell_started") if e["shell"] == hangups[0]["shell"]]
    assert shell_pid(second) not in stale


def test_the_spare_does_not_count_against_max_shells(make_agent):
    agent = make_agent(spare=1, **{"max-shells": 2})
    agent.attach()
    agent.wait_event("spare_started")
    second = agent.attach()  # takes the spare: two shells, the limit; no spare is started now
    agent.wait_event("spare_taken")
    mark(second, "second")
    agent.wait_event("spare_skipped")  # the spare due after the second login found no room
    third = agent.attach(prompt=False)
    third.expect_exact("limits.shells_per_user: at most 2 shells in a session")
    assert len(agent.events("spare_started")) == 1
