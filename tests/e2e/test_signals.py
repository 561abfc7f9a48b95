"""Signals sent to an attached client (not keys typed into it): ``kill -INT`` of ``sbroker attach``.

The owner's terminal is ``srun --pty`` to the session agent, with the local tty in raw
mode: ^C is a byte that reaches the shell's own pty, which interrupts the foreground job.
A SIGINT that reaches the client process itself is ignored (passed to ``srun`` it would
print the step's status, and a second one would cancel the step, i.e. detach): the shell
and the terminal carry on. An administrator's bridge (observe, or ``--write``) passes a
writer's SIGINT on as a ``signal`` message, which becomes the key in the shell's terminal;
an interrupted observer stops observing. None prints a traceback or loses the shell.
"""

from __future__ import annotations

import json
import subprocess

import pexpect
import pytest

from broker.client import Client
from tests.cluster import config as tb
from tests.integration.conftest import ensure_as, sbroker_json
from tests.waiting import wait_for

from .conftest import ALICE, PROMPT, PROMPT_RE, SOCKET, agent_status

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def spawn_attach(user: str, *args: str) -> pexpect.spawn:
    return pexpect.spawn("runuser", ["-u", user, "--", "env", f"SBROKER_SOCKET={SOCKET}", "TERM=xterm",
                                      str(tb.SBROKER_BIN), "attach", *args],
                         timeout=30, cwd="/", dimensions=(24, 100))


def client_pid(child: pexpect.spawn) -> int:
    """The ``sbroker`` process under ``runuser`` (which forks it and waits)."""
    def find() -> int | None:
        out = subprocess.run(["pgrep", "-P", str(child.pid)], capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else None
    return int(wait_for(find, 10, "the attach client's pid"))


def test_sigint_to_the_owners_client_is_ignored_and_ctrl_c_interrupts_the_foreground_job(broker):
    ensure_as(ALICE, "default")
    child = spawn_attach(ALICE, f"{ALICE}/default")
    try:
        child.send(f"PS1='{PROMPT}'; PROMPT_COMMAND=\r".encode())
        child.expect(PROMPT_RE)
        child.send(b"sh -c 'echo FG''-UP; exec sleep 300'\r")
        child.expect(rb"FG-UP\r\n")  # the foreground job runs (the typed line shows FG''-UP)
        subprocess.run(["kill", "-INT", str(client_pid(child))], check=True)
        child.send(b"\x03")  # the key, through srun and the agent, into the shell's pty
        child.expect(PROMPT_RE, timeout=10)  # long before sleep's 300 s
        child.send(b"echo sleep-rc=$?\r")
        child.expect(rb"sleep-rc=130")
        child.send(b"echo still-$((6*7))\r")
        child.expect(rb"still-42")
        assert child.isalive()
        child.send(b"exit 5\r")
        child.expect(pexpect.EOF)
        child.wait()
        assert child.exitstatus == 5
        assert b"Traceback" not in child.before
    finally:
        child.close(force=True)


def test_sigint_to_an_observer_ends_observing_cleanly(broker):
    ensure_as(ALICE, "default")
    writer = spawn_attach(ALICE, f"{ALICE}/default")
    observer = None
    try:
        writer.send(b"echo writer-ready-$((1+1))\r")
        writer.expect(rb"writer-ready-2")
        observer = spawn_attach(tb.ADMIN, "--observe", f"{ALICE}/default")
        wait_for(lambda: agent_status(f"{ALICE}/default")["observers"] == 1, 30, "the observer to attach")
        writer.send(b"echo seen-by-observer-$((3+4))\r")
        observer.expect(rb"seen-by-observer-7")
        subprocess.run(["kill", "-INT", str(client_pid(observer))], check=True)
        observer.expect(pexpect.EOF)
        observer.wait()
        assert observer.exitstatus == 130
        assert b"Traceback" not in observer.before
        writer.send(b"echo writer-unaffected\r")  # the shell and its writer carry on
        writer.expect(rb"writer-unaffected\r\n")
    finally:
        if observer is not None:
            observer.close(force=True)
        writer.close(force=True)


def test_sigint_to_an_admin_writer_interrupts_the_foreground_job_only(broker):
    ensure_as(ALICE, "default")
    admin = spawn_attach(tb.ADMIN, "--write", f"{ALICE}/default")
    try:
        admin.expect(rb"administrator \S+ is typing into this session")
        admin.send(f"PS1='{PROMPT}'; PROMPT_COMMAND=\r".encode())
        admin.expect(PROMPT_RE)
        admin.send(b"sh -c 'echo FG''-UP; exec sleep 300'\r")
        admin.expect(rb"FG-UP\r\n")  # the foreground job runs (the typed line shows FG''-UP)
        subprocess.run(["kill", "-INT", str(client_pid(admin))], check=True)
        admin.expect(PROMPT_RE, timeout=10)  # long before sleep's 300 s
        admin.send(b"echo sleep-rc=$?\r")
        admin.expect(rb"sleep-rc=130")
        admin.send(b"exit 4\r")
        admin.expect(pexpect.EOF)
        admin.wait()
        assert admin.exitstatus == 4
        assert b"Traceback" not in admin.before
    finally:
        admin.close(force=True)


def test_unknown_signal_is_one_clear_error_and_the_shell_survives(broker):
    session = ensure_as(ALICE, "default")["session"]
    # As the administrator, over the raw protocol: a bridged attach (typing, so signals are
    # passed on), then a signal the broker does not pass on.
    code = """import json, sys
sys.path.insert(0, sys.argv[1])
from broker.client import Client

def next_json(c):
    while True:
        kind, payload = c.recv_frame()
        if kind == b"J":
            return json.loads(payload)

c = Client(sys.argv[2])
c.send({"v": 1, "op": "attach", "session": sys.argv[3], "rows": 24, "cols": 80, "write_other": True})
while next_json(c)["type"] != "attached":
    pass
c.send({"type": "signal", "signal": "KILL"})
print(json.dumps(next_json(c)))
"""
    out = subprocess.run(["runuser", "-u", tb.ADMIN, "--", "/usr/bin/python3", "-c", code, str(tb.REPO), SOCKET,
                          session["id"]], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["type"] == "error" and reply["field"] == "signal", reply
    assert "must be one of INT, QUIT" in reply["message"]
    assert sbroker_json(ALICE, "show", session["id"])["state"] == "ready"
    with Client(str(SOCKET)) as c:  # the daemon keeps serving
        assert c.request("ping")["type"] == "result"
