"""The spare shell (issue 15): the agent starts the next login's shell ahead of time.

Its own module because it needs a broker with the product's default
``timeouts.spare_shell = true``; the module-scoped ``broker`` of the other e2e modules (with it
off) must be gone before this one binds the test socket.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import ensure_as, sbroker_json
from tests.waiting import wait_for

from .conftest import ALICE
from .test_shells_in_allocation import ssh_shell

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def spare_broker(cluster):
    """A broker with the product's default ``timeouts.spare_shell = true`` (the suite's is off)."""
    from tests.integration.daemon import BrokerProcess, reset_state

    reset_state()
    proc = BrokerProcess(timeouts_spare_shell=True)
    proc.start()
    yield proc
    proc.stop()
    reset_state()


def test_the_next_login_gets_the_spare_shell_started_ahead(spare_broker):
    session = ensure_as(ALICE, "spare")["session"]
    first = ssh_shell(project="spare")
    try:
        log_path = Path(sbroker_json(ALICE, "show", session["id"])["log_path"])

        def agent_events(name: str) -> list[dict]:
            lines = [line for line in log_path.read_text().splitlines() if line.startswith("{")]
            return [e for e in map(json.loads, lines) if e.get("event") == name]

        started = wait_for(lambda: agent_events("spare_started"), 30, "the agent to start a spare shell")
        second = ssh_shell(project="spare")
        try:
            taken = wait_for(lambda: agent_events("spare_taken"), 30, "the second login to take the spare")
            assert taken[0]["shell"] == started[0]["shell"]
            second.send(b"echo second-$((20+22))\r")
            second.expect(rb"second-42")
        finally:
            second.close(force=True)
    finally:
        first.close(force=True)
