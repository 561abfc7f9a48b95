"""Interactive logins through real ``ssh -tt`` (pexpect) and asyncssh: prompt in the container,
window size, ^C, exit status, detach/reattach with scrollback, observers, backpressure, UTF-8."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import asyncssh
import pexpect
import pytest

from tests.cluster import config as tb
from tests.integration.conftest import jobs_of, sbroker_json
from tests.waiting import wait_for

from .conftest import ALICE, PROMPT, PROMPT_RE, agent_status, broker_rss_kb, sbroker_env, ssh_argv

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


class Login:
    """One ``ssh -tt`` login under pexpect (bytes), with a recognisable prompt."""

    def __init__(self, user: str = ALICE, rows: int = 24, cols: int = 80, env: dict | None = None,
                 extra: tuple[str, ...] = (), set_prompt: bool = True) -> None:
        argv = ssh_argv(user, tty=True)
        argv[1:1] = list(extra)
        self.child = pexpect.spawn(argv[0], argv[1:], dimensions=(rows, cols), timeout=60,
                                   env={**os.environ, **(env or {})})
        if set_prompt:
            self.child.expect([rb"\$ ", rb"# "])
            self.sendline(f"PS1='{PROMPT}'; PROMPT_COMMAND=")
            self.child.expect(PROMPT_RE)

    def sendline(self, line: str) -> None:
        self.child.send(line.encode() + b"\r")

    def run(self, line: str, timeout: float = 30) -> bytes:
        """Type ``line``, return exactly what it printed (markers keep the echo out)."""
        tag = str(time.monotonic_ns())
        self.sendline(f"echo B{tag}''X; {line}; echo E{tag}''X")
        self.child.expect(f"B{tag}X\r\n".encode(), timeout=timeout)
        self.child.expect(f"E{tag}X\r\n".encode(), timeout=timeout)
        out = self.child.before
        self.child.expect(PROMPT_RE)
        return out

    def close(self) -> None:
        if self.child.isalive():
            self.child.kill(signal.SIGKILL)
        self.child.close(force=True)


@pytest.fixture
def login(broker):
    made: list[Login] = []

    def make(**kw) -> Login:
        made.append(Login(**kw))
        return made[-1]

    yield make
    for item in made:
        if item.child.isalive() and item.child.pid:
            try:
                item.sendline("exit 0")
                item.child.expect(pexpect.EOF, timeout=5)
            except (pexpect.TIMEOUT, pexpect.EOF, OSError):
                pass
        item.close()


def job_node(job_id: str) -> str:
    return subprocess.run(["squeue", "--noheader", "-j", job_id, "-o", "%N"], capture_output=True, text=True,
                          env=tb.slurm_env(), timeout=30).stdout.strip()


# ------------------------------------------------------------------------------ pexpect

def test_prompt_is_inside_the_container(login):
    s = login()
    fields = s.run('printf "%s|%s|%s|%s\\n" "$(hostname)" "$SLURM_JOB_ID" "$(id -un)" "$PWD"').decode()
    host, job, user, cwd = fields.strip().split("|")
    assert host in tb.NODES and host == job_node(job)  # the compute node's own name, not the login node's
    assert [j["job_id"] for j in jobs_of(ALICE, states="RUNNING")] == [job]
    assert user == ALICE
    assert cwd == "/home/sbalice/proj/default"
    assert s.run("tty").strip().startswith(b"/dev/pts/")


def test_keys_typed_before_the_prompt_are_not_lost(login):
    """Type-ahead right after ``ssh``: srun switches its terminal to raw mode with a flush,
    so the broker holds early keys until the shell side has spoken."""
    s = login(set_prompt=False)
    s.sendline("echo TYPE''AHEAD_$((6*7))")
    s.child.expect(rb"TYPEAHEAD_42", timeout=60)


def test_window_size_follows_resize(login):
    s = login(rows=33, cols=101)
    assert s.run("stty size").strip() == b"33 101"
    s.child.setwinsize(47, 150)
    wait_for(lambda: s.run("stty size").strip() == b"47 150", 10, "the shell's terminal to take the new size")


def test_ctrl_c_interrupts_foreground_command(login):
    s = login()
    s.sendline("sh -c 'echo FG''-UP; exec sleep 100'")
    s.child.expect(rb"FG-UP\r\n")   # the foreground job runs (the typed line shows FG''-UP)
    started = time.monotonic()
    s.child.sendcontrol("c")
    s.child.expect(PROMPT_RE, timeout=10)
    assert time.monotonic() - started < 5
    s.sendline("echo status=$?")
    s.child.expect(rb"status=(\d+)\r\n")
    assert s.child.match.group(1) == b"130"


def test_exit_status_is_ssh_status(login):
    s = login()
    s.sendline("exit 7")
    s.child.expect(pexpect.EOF, timeout=20)
    s.child.close()
    assert s.child.exitstatus == 7


def test_broken_terminal_size_still_works(login):
    s = login(rows=0, cols=0)
    assert s.run("stty size").strip() == b"24 80"
    assert s.run("echo ok").strip() == b"ok"


def test_utf8_split_across_reads_is_intact_in_a_terminal(login):
    s = login()
    s.sendline("python3 -c 'import sys; sys.stdout.write(\"BEG\" + \"IN\" + \"a\\u00e9\\u20ac\\U0001F600\" * 40000 + \"EN\" + \"D\")'; echo")
    s.child.expect(rb"BEGIN([^\x00]*?)END", timeout=30)
    assert s.child.match.group(1).decode("utf-8") == "aé€😀" * 40000
    s.child.expect(PROMPT_RE)


def test_drop_and_reattach_same_shell_with_scrollback(login):
    first = login()
    first.sendline("export E2E_MARK=kept-$((6*7))")
    first.child.expect(PROMPT_RE)
    first.run("echo SCROLL-$((1000+234))")
    pid = first.run("echo $$").strip()
    os.kill(first.child.pid, signal.SIGKILL)  # the SSH connection drops
    first.child.close(force=True)
    wait_for(lambda: agent_status(f"{ALICE}/default")["detached"] == 1, 30, "the agent to see the login go")
    second = login(set_prompt=False)
    second.child.expect(rb"SCROLL-1234", timeout=30)  # scrollback replayed first
    second.child.send(b"\r")
    second.child.expect(PROMPT_RE)
    assert second.run("echo $E2E_MARK").strip() == b"kept-42"
    assert second.run("echo $$").strip() == pid


def test_observer_sees_output_and_cannot_type(login):
    writer = login()
    cmd = f"{sbroker_env()} {tb.SBROKER_BIN} attach --observe {ALICE}/default"
    obs = pexpect.spawn("ssh", ["-tt", *tb.SSH_OPTS, f"{tb.ADMIN}@{tb.SSH_HOST}", cmd], timeout=30,
                        dimensions=(24, 80))
    try:
        wait_for(lambda: agent_status(f"{ALICE}/default")["observers"] == 1, 30, "the observer to attach")
        writer.run("echo WATCH-$((40+2))")
        obs.expect(rb"WATCH-42")
        obs.send(b"echo TYPED-BY-OBS-$((2+3))\r")
        # ^C ends an observer (exit 130): its client has then handled every key before it, and
        # once the agent counts no observer, nothing of that connection is left in flight.
        obs.sendcontrol("c")
        obs.expect(pexpect.EOF, timeout=30)
        obs.close()
        assert obs.exitstatus == 130
        wait_for(lambda: agent_status(f"{ALICE}/default")["observers"] == 0, 30, "the observer to be gone")
        out = writer.run("echo after")
        assert b"TYPED-BY-OBS" not in out and out.strip() == b"after"
        assert b"TYPED-BY-OBS-5" not in writer.child.before
        writer.run("echo HISTORY-CHECK")
        assert b"TYPED-BY-OBS" not in writer.run("history | tail -5")
    finally:
        obs.kill(signal.SIGKILL)
        obs.close(force=True)


def test_nonexistent_session_is_a_clear_error(broker):
    r = subprocess.run(["runuser", "-u", ALICE, "--", "env", sbroker_env(), str(tb.SBROKER_BIN), "attach",
                        "no-such-session"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "no session 'no-such-session'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def agent_pid(session: str) -> int:
    """Host pid of the session's agent (``python3 .../agent.py serve ... --status {instance}.agent.json``),
    among the processes of the session's node."""
    from tests.cluster import harness

    shown = sbroker_json(tb.ADMIN, "show", session)
    status = f"{shown['instance']}.agent.json"

    def cmdline(pid: int) -> list[str]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                return fh.read().decode(errors="replace").split("\0")
        except OSError:
            return []
    found = [p for p in harness.node(shown["node"]).pids()
             if "serve" in cmdline(p) and any(a.endswith(status) for a in cmdline(p))]
    assert len(found) == 1, f"agent of {session} on {shown['node']}: {found}"
    return found[0]


def test_stopped_client_grows_neither_the_agent_nor_the_broker(login, broker):
    """A flood into a terminal whose client stopped reading: the session agent, which holds the
    pty, stops reading it (backpressure) instead of buffering; the broker carries none of it."""
    s = login()
    agent = agent_pid(f"{ALICE}/default")
    s.sendline("yes E2E-FLOOD-LINE-OF-SOME-LENGTH-abcdefghijklmnopqrstuvwxyz")
    s.child.expect(rb"E2E-FLOOD")
    os.kill(s.child.pid, signal.SIGSTOP)  # the client stops reading
    try:
        base = {"agent": broker_rss_kb(agent), "broker": broker_rss_kb(broker.proc.pid)}
        peak = dict(base)
        for _ in range(16):   # 8 s of flood at the pty: unbounded buffering would show in MBs
            time.sleep(0.5)
            peak = {"agent": max(peak["agent"], broker_rss_kb(agent)),
                    "broker": max(peak["broker"], broker_rss_kb(broker.proc.pid))}
        for who in ("agent", "broker"):
            assert peak[who] - base[who] < 20 * 1024, f"{who} RSS grew from {base[who]} kB to {peak[who]} kB"
    finally:
        os.kill(s.child.pid, signal.SIGCONT)
    s.child.sendcontrol("c")
    deadline = time.monotonic() + 60
    while True:  # drain the backlog until the prompt comes back
        s.child.expect([PROMPT_RE, pexpect.TIMEOUT], timeout=2)
        if s.child.after is not pexpect.TIMEOUT:
            break
        s.child.sendcontrol("c")
        assert time.monotonic() < deadline
    assert s.run("echo alive").strip() == b"alive"


# ------------------------------------------------------------------------------ asyncssh

async def _asyncssh_session() -> None:
    async with asyncssh.connect(tb.SSH_HOST, port=tb.SSH_PORT, username=ALICE, client_keys=[str(tb.SSH_KEY)],
                                known_hosts=None) as conn:
        proc = await conn.create_process(term_type="xterm", term_size=(90, 30), encoding=None)

        pending = bytearray()

        async def until(pattern: bytes, timeout: float = 30) -> bytes:
            """Read until ``pattern``; return everything up to and including it, keep the rest."""
            async def read() -> bytes:
                while pattern not in pending:
                    chunk = await proc.stdout.read(4096)
                    if not chunk:
                        raise AssertionError(f"EOF before {pattern!r}: {bytes(pending[-300:])!r}")
                    pending.extend(chunk)
                end = pending.index(pattern) + len(pattern)
                out = bytes(pending[:end])
                del pending[:end]
                return out
            return await asyncio.wait_for(read(), timeout)

        await until(b"$ ")
        proc.stdin.write(b"PS1='AS''YNC> '\r")
        await until(b"ASYNC> ")
        proc.stdin.write(b"echo H=$(hostname) U=$(id -un) J=$SLURM_JOB_ID D=$PWD E''ND\r")
        out = await until(b" END\r\n")
        line = out[out.rindex(b"H="):].split(b"\r\n")[0].decode()
        host = line.split()[0][2:]
        assert host in tb.NODES and f"U={ALICE}" in line.split() and "D=/home/sbalice/proj/default" in line.split()
        assert [j["job_id"] for j in jobs_of(ALICE, states="RUNNING")] == [line.split("J=")[1].split()[0]]
        await until(b"ASYNC> ")
        proc.change_terminal_size(123, 41)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:   # the resize travels ssh -> srun -> agent: ask until the pty has it
            proc.stdin.write(b"echo S=$(stty size)=''S\r")   # the typed line shows =''S
            size = (await until(b"=S\r\n")).rsplit(b"S=", 1)[1]
            await until(b"ASYNC> ")
            if size == b"41 123=S\r\n":
                break
        assert size == b"41 123=S\r\n", size
        proc.stdin.write(b"sh -c 'echo FG''-UP; exec sleep 100'\r")
        await until(b"FG-UP\r\n")   # the foreground job runs (the typed line shows FG''-UP)
        proc.stdin.write(b"\x03")
        await until(b"ASYNC> ", timeout=10)
        proc.stdin.write(b"exit 7\r")
        result = await asyncio.wait_for(proc.wait(check=False), 30)
        assert result.exit_status == 7


def test_asyncssh_login(broker):
    asyncio.run(_asyncssh_session())


async def _asyncssh_zero_size() -> int:
    async with asyncssh.connect(tb.SSH_HOST, port=tb.SSH_PORT, username=ALICE, client_keys=[str(tb.SSH_KEY)],
                                known_hosts=None) as conn:
        proc = await conn.create_process(term_type="xterm", term_size=(0, 0), encoding=None)
        out = b""
        while not out.endswith((b"$ ", b"# ")):
            out += await asyncio.wait_for(proc.stdout.read(1 << 20), 30)
        proc.stdin.write(b"stty size; exit 4\r")
        out = await asyncio.wait_for(proc.stdout.read(1 << 20), 30)
        while b"24 80" not in out:
            chunk = await asyncio.wait_for(proc.stdout.read(1 << 20), 30)
            if not chunk:
                break
            out += chunk
        assert b"24 80" in out, out[-400:]
        result = await asyncio.wait_for(proc.wait(check=False), 30)
        return result.exit_status


def test_asyncssh_zero_terminal_size(broker):
    assert asyncio.run(_asyncssh_zero_size()) == 4
