"""The first login's shell (``--first-shell``/``--first-term``): started when the start script
says the instance is up (SIGUSR1), taken by the login that created the session.

Real agent, real ptys and shells (no SLURM); see test_sessionagent.py for the harness.
"""

from __future__ import annotations

import json
import os
import signal

from .test_sessionagent import SHELL, make_agent, mark, shell_pid  # noqa: F401  (fixture)


def test_the_first_shell_starts_at_the_instance_up_signal_and_the_first_login_takes_it(make_agent):
    agent = make_agent(spare=1, **{"first-shell": json.dumps(SHELL), "first-term": "dumb"})
    assert not agent.events("spare_started")  # nothing before the instance is up
    os.kill(agent.proc.pid, signal.SIGUSR1)
    [started] = agent.wait_event("spare_started")
    login = agent.attach()  # TERM=dumb, the same shell argv: its prompt is the first shell's
    [taken] = agent.wait_event("spare_taken")
    assert taken["shell"] == started["shell"]
    assert shell_pid(login) == [e["pid"] for e in agent.events("shell_started") if e["shell"] == taken["shell"]][0]
    mark(login, "first-shell-works")


def test_a_first_login_with_another_terminal_gets_a_fresh_shell(make_agent):
    agent = make_agent(spare=1, **{"first-shell": json.dumps(SHELL), "first-term": "xterm-256color"})
    os.kill(agent.proc.pid, signal.SIGUSR1)
    agent.wait_event("spare_started")
    login = agent.attach()  # TERM=dumb: not the shell that was started ahead
    [hangup] = agent.wait_event("hangup")
    assert hangup["why"] == "spare shell out of date"
    assert not agent.events("spare_taken")
    mark(login, "fresh-shell-works")
