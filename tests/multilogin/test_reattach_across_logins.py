"""A shell detached on one login node is reattached through the other (issue 15).

The shell lives in the session's agent in the allocation, not in either broker: an SSH
connection to login1 that drops leaves it detached, and the next interactive login through
login2 (its own sshd and broker) reattaches it: same shell, variables intact, recent
output replayed first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pexpect
import pytest

from tests.cluster import config as tb
from tests.integration.conftest import sbroker_json
from tests.waiting import wait_for
from tests.integration.daemon import BrokerProcess

from .daemons import Login2Broker, running_both

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ALICE = tb.USERS[0]
PROMPT = "XLOGIN> "


@pytest.fixture
def both_logins(cluster):
    with running_both(BrokerProcess(), Login2Broker()) as both:
        yield both


def agent_status() -> dict:
    """The agent's status file of alice's default session (read as root, a test's privilege)."""
    shown = sbroker_json(ALICE, "show", "default")
    return json.loads(Path(shown["log_path"]).with_name(f"{shown['instance']}.agent.json").read_text())


def interactive(port: int) -> pexpect.spawn:
    argv = tb.ssh_command(ALICE, tty=True, port=port)
    return pexpect.spawn(argv[0], argv[1:], timeout=120, dimensions=(24, 100))


def test_detach_on_login1_reattach_on_login2_same_shell_with_scrollback(both_logins):
    first = interactive(tb.SSH_PORT)
    try:
        first.send(f"PS1='{PROMPT}'; PROMPT_COMMAND=\r".encode())
        first.expect(PROMPT)
        first.send(b"export MARK=from-login1-$((6*7)); echo $$ > /tmp/xlogin-shell-pid; "
                   b"echo recent-output-$((1000+337))\r")
        first.expect(rb"recent-output-1337\r\n")
        first.expect(PROMPT)
    finally:
        first.close(force=True)  # the connection drops: the shell stays detached in the agent
    wait_for(lambda: agent_status()["detached"] == 1, 30, "the agent to see the login1 terminal go")

    second = interactive(tb.LOGIN2_SSH_PORT)
    try:
        # The replay (the shell's recent output) comes first, before anything is typed.
        second.expect(rb"recent-output-1337\r\n")
        second.send(b"\r")
        second.expect(PROMPT)
        second.send(b"echo mark=$MARK same=$( [ $$ = $(cat /tmp/xlogin-shell-pid) ] && echo yes || echo no)\r")
        second.expect(rb"mark=(\S+) same=(\w+)")
        assert second.match.group(1, 2) == (b"from-login1-42", b"yes")
        second.send(b"exit 0\r")
        second.expect(pexpect.EOF)
        second.wait()
        assert second.exitstatus == 0
    finally:
        second.close(force=True)
