"""The session agent (broker/agent/sessionagent.py) as a real process, driven through ptys.

Each test copies the module into a fresh private directory as ``agent.py`` (as the batch
script does), starts ``serve`` with its JSON log on stderr in a file, and attaches with
``attach -- bash --norc --noprofile -i`` under pexpect. Shells inherit the agent's
environment, so ``PS1`` set there fixes the prompt. Every wait is bounded and positive
(a log line, the status file, a marker the shell prints); negative checks come only after
a positive event that proves the thing checked had its chance to happen.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
from pathlib import Path

import pexpect
import pytest

from tests.waiting import wait_for

SOURCE = Path(__file__).resolve().parents[2] / "broker" / "agent" / "sessionagent.py"
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
SHELL = ["bash", "--norc", "--noprofile", "-i"]
PROMPT = "ag$ "
TIMEOUT = 15.0


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it may be waiting for a reaper the test does not control)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def session_members(sessions: set[int]) -> list[int]:
    """Live processes in any of these sessions (a shell and every job it started)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(int(entry))
            if fields and fields[0] != "Z" and int(fields[3]) in sessions:
                found.append(int(entry))
    return found


class Agent:
    """One ``serve`` process in a private directory, with helpers to attach and read its log."""

    def __init__(self, base: Path, **options: object) -> None:
        base.mkdir(parents=True)
        # Under /tmp (mkdtemp: 0700), not pytest's 0700 tree: another uid must be able to
        # reach the directory itself for its mode to be what keeps it out.
        self.dir = Path(tempfile.mkdtemp(prefix="sbroker-agent-test-"))
        self.script = self.dir / "agent.py"
        shutil.copyfile(SOURCE, self.script)
        self.status_path = base / "status.json"
        self.log_path = base / "agent.log"
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(base), "LANG": "C",
                    "TERM": "dumb", "PS1": PROMPT}
        opts = {"grace": 60, "scrollback": 65536, "max-shells": 8, "max-detached": 4,
                "walltime-warnings": "1800,300", **options}
        argv = [PYTHON, "-I", "-S", str(self.script), "serve", "--dir", str(self.dir),
                "--status", str(self.status_path)]
        for name, value in opts.items():
            argv += [f"--{name}", str(value)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        self.children: list[pexpect.spawn] = []
        wait_for(lambda: self.events("agent_started") and self.status_path.exists(), TIMEOUT,
                 lambda: f"the agent to start; log: {self.log_path.read_text()!r}")

    def events(self, name: str) -> list[dict]:
        lines = self.log_path.read_text().split("\n")[:-1]  # complete lines only: the agent may be mid-write
        return [e for e in (json.loads(line) for line in lines if line.startswith("{")) if e["event"] == name]

    def wait_event(self, name: str, count: int = 1, timeout: float = TIMEOUT) -> list[dict]:
        return wait_for(lambda: len(self.events(name)) >= count and self.events(name), timeout,
                        lambda: f"{count} {name!r} log line(s); log: {self.log_path.read_text()!r}")

    def attach(self, *options: str, prompt: bool = True, dimensions: tuple[int, int] = (24, 80)) -> pexpect.spawn:
        child = pexpect.spawn(PYTHON, ["-I", "-S", str(self.script), "attach", *options, "--", *SHELL],
                              env=self.env, timeout=TIMEOUT, dimensions=dimensions,
                              encoding="utf-8", codec_errors="replace")
        child.logfile_read = io.StringIO()  # everything this terminal ever showed
        self.children.append(child)
        if prompt:
            child.expect_exact(PROMPT)
        return child

    def status_file(self) -> dict:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}

    def status_command(self) -> dict:
        out = subprocess.run([PYTHON, "-I", "-S", str(self.script), "status"], env=self.env,
                             capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
        return json.loads(out)

    def stop(self) -> None:
        """SIGTERM (then SIGKILL), and no process of any of its shells may be left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for child in self.children:
            child.close(force=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        sessions = {e["pid"] for e in self.events("shell_started")}
        wait_for(lambda: not session_members(sessions), TIMEOUT,
                 lambda: f"the shells' processes to end: {session_members(sessions)}")


@pytest.fixture
def make_agent(tmp_path):
    agents: list[Agent] = []

    def make(**options: object) -> Agent:
        agents.append(Agent(tmp_path / f"a{len(agents)}", **options))
        return agents[-1]

    yield make
    for agent in agents:
        agent.stop()


@pytest.fixture
def agent(make_agent):
    return make_agent()


def finish(child: pexpect.spawn) -> int:
    """The attach process's exit status once its terminal closes."""
    child.expect(pexpect.EOF)
    child.wait()
    assert child.signalstatus is None, f"attach was killed by signal {child.signalstatus}"
    return child.exitstatus


def shell_pid(child: pexpect.spawn) -> int:
    """``$$`` of the attached shell (the echoed command line has no digits after ``PID=``)."""
    child.sendline("echo PID=$$")
    child.expect(r"PID=(\d+)")
    return int(child.match.group(1))


def mark(child: pexpect.spawn, name: str) -> None:
    """Run a command and wait for its output (``$((6*7))`` keeps the typed echo from matching)."""
    child.sendline(f"echo {name}-$((6*7))")
    child.expect_exact(f"{name}-42")


def detach(agent: Agent, child: pexpect.spawn) -> None:
    """Drop the attach process (as a lost SSH connection does) and wait until the agent noticed."""
    before = len(agent.events("detach"))
    child.close(force=True)
    agent.wait_event("detach", before + 1)


def test_exit_status_is_the_shells(agent):
    """``sbroker login`` exits with the shell's status: exactly, and 128+n when a signal killed it."""
    child = agent.attach()
    child.sendline("exit 7")
    assert finish(child) == 7
    child = agent.attach()
    child.sendline("kill -KILL $$")
    assert finish(child) == 128 + signal.SIGKILL
    assert [e["status"] for e in agent.events("shell_exited")] == [7, 128 + signal.SIGKILL]


def test_reattach_finds_the_same_shell_and_its_output(agent):
    """A lost connection loses nothing: the reattach gets the same shell, replaying its recent output."""
    child = agent.attach()
    child.sendline("export KEPT=value-$((2*3))")
    mark(child, "SCROLLED")
    pid = shell_pid(child)
    detach(agent, child)
    again = agent.attach(prompt=False)
    again.expect_exact("SCROLLED-42")  # nothing typed yet: only the replay can show it
    assert shell_pid(again) == pid
    again.sendline("echo KEPT=$KEPT")
    again.expect_exact("KEPT=value-6")
    assert len(agent.events("reattach")) == 1
    assert len(agent.events("shell_started")) == 1


def test_second_writer_gets_a_new_shell(agent):
    """A shell has one writer: a second login while the first is attached gets a shell of its own."""
    first, second = agent.attach(), agent.attach()
    assert shell_pid(first) != shell_pid(second)
    assert len(agent.events("shell_started")) == 2
    assert not agent.events("reattach")


def test_detach_grace_ends_an_abandoned_shell(make_agent):
    """A detached shell lives ``--grace`` seconds; then it is hung up and a new login starts afresh."""
    agent = make_agent(grace=2)
    child = agent.attach()
    pid = shell_pid(child)
    detach(agent, child)
    assert alive(pid), "the shell must outlive its connection for the grace"
    agent.wait_event("shell_expired", timeout=10)
    wait_for(lambda: not alive(pid), TIMEOUT, f"the expired shell {pid} to end")
    fresh = agent.attach()
    assert shell_pid(fresh) != pid
    assert not agent.events("reattach")


def test_background_jobs_run_until_the_grace_ends(make_agent, tmp_path):
    """A detached shell's background jobs keep running during the grace, and end with the shell."""
    agent = make_agent(grace=4)
    ticks = tmp_path / "ticks"
    child = agent.attach()
    child.sendline(f"(while :; do date +%s.%N >> {ticks}; sleep 0.2; done) &")
    child.sendline("echo BG=$!")
    child.expect(r"BG=(\d+)")
    loop = int(child.match.group(1))
    pid = shell_pid(child)
    wait_for(ticks.exists, TIMEOUT, "the background loop to write")
    detach(agent, child)
    lines = len(ticks.read_text().splitlines())
    wait_for(lambda: len(ticks.read_text().splitlines()) >= lines + 5, TIMEOUT, "the loop to go on while detached")
    assert not agent.events("shell_expired"), "the loop ran on only after the grace"
    agent.wait_event("shell_expired", timeout=10)
    wait_for(lambda: not alive(loop), TIMEOUT, f"the background loop {loop} to end with its shell")
    wait_for(lambda: not session_members({pid}), TIMEOUT, lambda: f"the session's processes to end: "
             f"{session_members({pid})}")


def unread_input(child: pexpect.spawn) -> int:
    """Bytes typed into ``child``'s terminal that its process has not read yet."""
    fd = os.open(f"/proc/{child.pid}/fd/0", os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)
    finally:
        os.close(fd)


def test_observer_sees_and_cannot_type(agent, tmp_path):
    """An observer gets the shell's output but its keystrokes never reach the shell."""
    writer = agent.attach()
    observer = agent.attach("--mode", "observe", prompt=False)
    agent.wait_event("observe")
    observer.sendline("echo OBSERVER-TYPED")
    wait_for(lambda: unread_input(observer) == 0, TIMEOUT, "the observer's client to read its keystrokes")
    marker = tmp_path / "marker"
    writer.sendline(f"echo WRITER-$((6*7)) > {marker}; cat {marker}")
    writer.expect_exact("WRITER-42")
    observer.expect_exact("WRITER-42")  # the writer's command ran after the observer's keys were read
    mark(writer, "AFTER")
    assert marker.read_text() == "WRITER-42\n"
    assert "OBSERVER-TYPED" not in writer.logfile_read.getvalue()
    observer.send("\x03")  # an observer leaves with ^C; the shell goes on
    assert finish(observer) == 130
    mark(writer, "STILL")


def test_window_size_follows_the_terminal(agent):
    """The shell starts with the terminal's size, and a resize (SIGWINCH) is relayed to it."""
    child = agent.attach(dimensions=(30, 100))
    child.sendline("stty size")
    child.expect(r"\n30 100\r")
    child.setwinsize(40, 120)
    # The resize and the next keystrokes travel separately (signal vs. stdin): poll, bounded.
    child.sendline('for i in $(seq 100); do [ "$(stty size)" = "40 120" ] && break; sleep 0.05; done; stty size')
    child.expect(r"\n(\d+ \d+)\r")
    assert child.match.group(1) == "40 120"


def test_shell_limit_refuses_with_one_line(make_agent):
    """Beyond ``--max-shells`` a login gets one line naming the limit, and status 1."""
    agent = make_agent(**{"max-shells": 1})
    agent.attach()
    refused = agent.attach(prompt=False)
    assert finish(refused) == 1
    lines = [line for line in refused.logfile_read.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "limits.shells_per_user" in lines[0]
    assert len(agent.events("limit_refused")) == 1
    assert len(agent.events("shell_started")) == 1


def test_detached_limit_ends_the_oldest(make_agent):
    """Beyond ``--max-detached`` detached shells the oldest detached one is ended."""
    agent = make_agent(**{"max-detached": 1})
    first, second = agent.attach(), agent.attach()
    first_pid, second_pid = shell_pid(first), shell_pid(second)
    ids = {e["pid"]: e["shell"] for e in agent.events("shell_started")}
    detach(agent, first)
    detach(agent, second)
    assert [e["shell"] for e in agent.wait_event("limit_detached")] == [ids[first_pid]]
    wait_for(lambda: not alive(first_pid), TIMEOUT, "the oldest detached shell to end")
    assert alive(second_pid)
    assert shell_pid(agent.attach(prompt=False)) == second_pid


def counts(status: dict) -> tuple:
    return status.get("shells"), status.get("writers"), status.get("detached")


def test_status_file_and_command(agent):
    """The status file (what the broker reads for idleness) and ``status`` follow attach and detach."""
    child = agent.attach()
    wait_for(lambda: counts(agent.status_file()) == (1, 1, 0), TIMEOUT, lambda: f"attached: {agent.status_file()}")
    live = agent.status_command()
    assert live["type"] == "result"
    assert counts(live) == (1, 1, 0)
    assert live["last_attach"] > 0
    assert agent.status_file()["last_attach"] == live["last_attach"]
    assert live["last_input"] == 0, "no key was typed yet"
    mark(child, "TYPED")
    assert agent.status_command()["last_input"] >= live["last_attach"]
    detach(agent, child)
    wait_for(lambda: counts(agent.status_file()) == (1, 0, 1), TIMEOUT, lambda: f"detached: {agent.status_file()}")
    assert counts(agent.status_command()) == (1, 0, 1)


def test_attach_refuses_a_directory_others_can_enter(agent, tmp_path):
    """The client trusts the socket only in a private directory: the same live agent reached
    through a 0755 directory is refused; the same directory at 0700 works."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    shutil.copyfile(SOURCE, shared / "agent.py")
    os.link(agent.dir / "agent.sock", shared / "agent.sock")  # the live agent, one path away
    result = subprocess.run([PYTHON, "-I", "-S", str(shared / "agent.py"), "attach", "--", *SHELL],
                            env=agent.env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 255
    assert "is not a private directory" in result.stderr
    assert not agent.events("attach")
    assert not agent.events("shell_started")
    os.chmod(shared, 0o700)
    status = subprocess.run([PYTHON, "-I", "-S", str(shared / "agent.py"), "status"], env=agent.env,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pid"] == agent.proc.pid


CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("errno", e.errno)
    sys.exit(0)
print("connected", repr(s.recv(100)))  # the agent checks the peer before reading anything
"""


def test_another_uid_cannot_connect(agent):
    """The 0700 directory keeps other users off the socket; were it reachable, SO_PEERCRED refuses them."""
    def as_nobody() -> str:
        return subprocess.run(["runuser", "-u", "nobody", "--", PYTHON, "-I", "-S", "-c", CONNECT,
                               str(agent.dir / "agent.sock")], capture_output=True, text=True,
                              timeout=TIMEOUT, check=True).stdout.strip()
    assert as_nobody() == f"errno {errno.EACCES}"
    os.chmod(agent.dir, 0o711)  # reachable (a test-only breach): the agent itself must refuse
    os.chmod(agent.dir / "agent.sock", 0o777)
    assert as_nobody() == "connected b''"
    assert [e["uid"] for e in agent.wait_event("peer_refused")] == [65534]
    os.chmod(agent.dir, 0o700)


def test_sigterm_hangs_up_every_shell(agent):
    """Stopping the agent (the job ending) hangs up all shells: each ends with 129 (SIGHUP)."""
    attached = agent.attach()
    pids = [shell_pid(attached)]
    detached = agent.attach()
    pids.append(shell_pid(detached))
    detach(agent, detached)
    agent.proc.send_signal(signal.SIGTERM)
    assert finish(attached) == 128 + signal.SIGHUP
    assert agent.proc.wait(TIMEOUT) == 0
    assert sorted(e["status"] for e in agent.events("shell_exited")) == [129, 129]
    assert not any(alive(pid) for pid in pids)
    assert not (agent.dir / "agent.sock").exists()
