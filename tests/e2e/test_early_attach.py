"""The first login's terminal starts while the instance starts (``early`` in broker.server).

An interactive login that creates a session gets its attach argv as soon as the session's
agent is up; the agent holds the login until the start script says the instance is up
(SIGUSR1), then gives it the shell it started ahead. Through the real sshd and real SLURM, in
the immediate launch mode (its session is STARTING from the allocation on, so the early
terminal always comes; a batch session gets it only when the poller sees its job run before
the instance is up):

* the login reaches a working prompt, and the broker handed its terminal out early;
* when the instance then fails to start, the login ends with the one-line reason, exit 1,
  and its terminal is back in cooked mode (srun --pty had made it raw).
"""

from __future__ import annotations

import pexpect
import pytest

from tests.cluster import config as tb
from tests.integration.daemon import LOG_PATH, BrokerProcess, reset_state

from .conftest import ALICE, PROMPT_RE

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PROFILES = """
[profiles.cpu]
default = true

[profiles.broken]
binds = [{host_path = "/nonexistent-sbroker-bind", container_path = "/mnt/x", mode = "ro"}]
"""


@pytest.fixture(scope="module")
def early_broker(cluster):
    reset_state()
    proc = BrokerProcess(extra_toml=PROFILES, timeouts_spare_shell=True, slurm_launch="immediate")
    proc.start()
    yield proc
    proc.stop()
    reset_state()


def _early_attaches() -> int:
    return LOG_PATH.read_text(errors="replace").count('"event": "early_attach"')


def test_the_first_login_gets_its_terminal_while_the_instance_starts(early_broker):
    before = _early_attaches()
    argv = tb.ssh_command(ALICE, "@early", tty=True)
    child = pexpect.spawn(argv[0], argv[1:], timeout=120, dimensions=(24, 100))
    try:
        child.send(b"PS1='E2E-PROMPT> '; PROMPT_COMMAND=\r")
        child.expect(PROMPT_RE)
        child.send(b"echo works-$((6*7))\r")
        child.expect(rb"works-42")
        child.send(b"exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert _early_attaches() == before + 1


def test_an_instance_that_fails_after_an_early_attach_ends_the_login_with_its_reason(early_broker):
    before = _early_attaches()
    argv = tb.ssh_command(ALICE, "@earlyfail:broken", tty=True)
    child = pexpect.spawn(argv[0], argv[1:], timeout=120, dimensions=(24, 100))
    try:
        # One line, ended by \r\n: the terminal is cooked again (a raw one prints a bare \n).
        child.expect(rb"sbroker: instance failed to start: apptainer instance start exited with status \d+"
                     rb"[^\r\n]*\r\n")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 1
    assert _early_attaches() == before + 1  # its terminal had started before the failure
