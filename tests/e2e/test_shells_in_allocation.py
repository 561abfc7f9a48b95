"""Shells live in the allocation (issue 15): the broker is out of the terminal's data path.

Through the real sshd, a real ``ssh -tt`` client and real SLURM: a ``kill -9`` of the
broker, or a clean restart, in the middle of a command streaming output to an attached
terminal changes nothing for it; and once a session ends, no process of its shells is left
on the compute node.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pexpect
import pytest

from tests.cluster import config as tb
from tests.cluster import harness
from tests.integration.conftest import ensure_as, jobs_of, sbroker, sbroker_json
from tests.waiting import wait_for

from .conftest import ALICE, PROMPT, PROMPT_RE

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LINES = 200_000
#: ``seq 1 200000`` in ten bursts 0.3 s apart, so the stream is still running when the
#: broker is killed a few thousand lines in (the test image has no awk or pv).
STREAM = (f"for b in 0 1 2 3 4 5 6 7 8 9; do seq $((b*{LINES // 10}+1)) $(((b+1)*{LINES // 10})); sleep 0.3; done; "
          "echo STREAM-DONE-$((40+2))")


def ssh_shell(user: str = ALICE, project: str | None = None) -> pexpect.spawn:
    remote = [f"@{project}"] if project else []
    argv = tb.ssh_command(user, *remote, tty=True)
    child = pexpect.spawn(argv[0], argv[1:], timeout=60, dimensions=(24, 100), maxread=1 << 16)
    child.send(f"PS1='{PROMPT}'; PROMPT_COMMAND=\r".encode())
    child.expect(PROMPT_RE, timeout=120)
    child.expect(PROMPT_RE)  # the prompt drawn after PS1 was set
    return child


def stream_across(child: pexpect.spawn, disrupt) -> bytes:
    """Start :data:`STREAM`, call ``disrupt()`` a few thousand lines in, return all it printed."""
    child.send(f"{STREAM}\r".encode())
    child.expect(rb"\r\n5000\r\n")
    seen = child.before + child.after
    assert b"STREAM-DONE-42" not in seen
    disrupt()
    child.expect(rb"STREAM-DONE-42\r\n", timeout=120)
    return seen + child.before


def assert_whole_stream(output: bytes) -> None:
    # Lines end in \r\n; bash's bracketed-paste switch ends in a bare \r before the first one.
    numbers = [int(n) for n in re.findall(rb"^(\d+)$", output.replace(b"\r\n", b"\n").replace(b"\r", b"\n"), re.M)]
    assert numbers == list(range(1, LINES + 1)), (
        f"{len(numbers)} lines; first differences at "
        f"{next((i for i, (a, b) in enumerate(zip(numbers, range(1, LINES + 1))) if a != b), len(numbers))}")


@pytest.mark.parametrize("how", ["kill -9", "clean restart"])
def test_broker_death_during_a_streaming_command_changes_nothing_for_the_terminal(broker, how):
    ensure_as(ALICE, "default")
    child = ssh_shell()
    try:
        child.send(b"export MARK=kept-$((6*7)); echo $$ > /tmp/shell-pid-before\r")
        child.expect(PROMPT_RE)
        old_pid = broker.proc.pid

        def disrupt() -> None:
            if how == "kill -9":
                broker.kill9()
            else:
                broker.stop()
            broker.start()  # as systemd would (Restart=always / an upgrade)

        output = stream_across(child, disrupt)
        assert broker.proc.pid != old_pid
        assert_whole_stream(output)
        # The session goes on: the same shell, its variables, and a working terminal.
        child.send(b"echo mark=$MARK same=$( [ $$ = $(cat /tmp/shell-pid-before) ] && echo yes || echo no)\r")
        child.expect(rb"mark=(\S+) same=(\w+)")
        assert child.match.group(1, 2) == (b"kept-42", b"yes")
        child.send(b"exit 3\r")
        child.expect(pexpect.EOF)
        child.wait()
        assert child.exitstatus == 3
    finally:
        child.close(force=True)
    # The restarted broker still knows the session as ready and in the same job.
    listed = [s for s in sbroker_json(ALICE, "ls", "--json") if s["project"] == "default"]
    assert [s["state"] for s in listed] == ["ready"]


def _node_processes(node: str, user: str) -> list[str]:
    out = subprocess.run(harness.on_node(node, "ps", "-u", user, "-o", "pid=,args="), capture_output=True,
                         text=True, timeout=30)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def test_no_process_of_the_sessions_shells_remains_on_the_node_after_it_ends(broker):
    session = ensure_as(ALICE, "leftovers")["session"]
    shown = sbroker_json(ALICE, "show", session["id"])
    node = shown["node"]
    status = json.loads(Path(shown["log_path"]).with_name(f"{shown['instance']}.agent.json").read_text())
    agent_dir = status["dir"]
    child = ssh_shell(project="leftovers")
    try:
        # Work that would outlive a careless end: background, nohup, its own session.
        child.send(b"sleep 4101 & nohup sleep 4102 >/dev/null 2>&1 & setsid sleep 4103 & echo started-$((1+1))\r")
        child.expect(rb"started-2")
        child.expect(PROMPT_RE)
        running = wait_for(lambda: [p for p in _node_processes(node, ALICE) if re.search(r"sleep 410[123]", p)],
                           20, "the shell's processes on the node")
        assert len(running) == 3, running
        assert [p for p in _node_processes(node, ALICE) if agent_dir in p and "serve" in p]
        sbroker(ALICE, "kill", session["id"])
        child.expect(pexpect.EOF, timeout=60)  # the terminal ends with the session
    finally:
        child.close(force=True)
    wait_for(lambda: not [j for j in jobs_of(ALICE) if j["job_id"] == session["job_id"]], 60,
             "the session's job to leave squeue")
    left = [p for p in _node_processes(node, ALICE) if "sleep 410" in p or agent_dir in p]
    assert left == [], left
    gone = subprocess.run(harness.on_node(node, "test", "-e", agent_dir), timeout=30)
    assert gone.returncode == 1, f"{agent_dir} is still on {node}"
