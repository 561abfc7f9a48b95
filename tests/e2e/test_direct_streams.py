"""Commands without a terminal take the direct stream to the session agent (issue 19).

Through the real sshd (ForceCommand ``sbroker login``), real SLURM and the session agent on
the compute node: ``ssh host cmd``, scp (both modes), sftp and rsync, their bytes, exit
status and stderr run over the agent's TCP stream, not an ``srun --overlap`` step; a file
scp writes is in the interactive shell at once and one the shell writes is fetched by scp;
files land where the container sees them (a path it maps elsewhere; ``/tmp``, which is the
instance's own on the compute node, never the login node's); a login that goes away hangs
its command up. With ``transfer.direct = false``
the same command is an ``srun`` step again.

The daemon runs with ``container.project_dir = /home/{user}/mapped/{project}``, so the
container's ``/home/USER/proj/PROJECT`` is a different host directory (a path the container
maps elsewhere). What the agent did is read from its JSON lines in the job log.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import secrets
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pexpect
import pytest

from tests.cluster import config as tb
from tests.cluster import harness
from tests.hostile._peer import agent_events, broker_with
from tests.integration.conftest import ensure_as, sbroker_json, wait_node
from tests.integration.daemon import BrokerProcess, reset_state
from tests.waiting import wait_for

from .conftest import ALICE, ssh

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

#: The host directory the container shows at /home/USER/proj/PROJECT.
MAPPED_PROJECT_DIR = "/home/{user}/mapped/{project}"
PROJECT = "default"
HOME = Path(f"/home/{ALICE}")
MIB = 1024 * 1024


# ----------------------------------------------------------------------------- the session

@dataclass
class Live:
    """Alice's running session: its job, node, instance and job log (the agent writes there)."""

    job_id: str
    node: str
    instance: str
    log: Path

    def status(self) -> dict:
        """The agent's status file (``{instance}.agent.json`` beside the job log)."""
        try:
            return json.loads(self.log.with_name(f"{self.instance}.agent.json").read_text())
        except (OSError, ValueError):
            return {}

    def offset(self) -> int:
        """How many agent lines the job log holds now: ``since`` for :meth:`events`."""
        return len(agent_events(self.log))

    def events(self, event: str, since: int = 0, pid: int | None = None) -> list[dict]:
        """The agent's ``event`` lines after the first ``since`` (about command ``pid`` only, if given)."""
        return [e for e in agent_events(self.log)[since:]
                if e["event"] == event and (pid is None or e.get("pid") == pid)]

    def wait_event(self, event: str, since: int, pid: int, timeout: float) -> dict:
        return wait_for(lambda: self.events(event, since, pid), timeout,
                        lambda: f"the agent's {event} line about command {pid} ({agent_events(self.log)[since:]})")[0]

    def numbered_steps(self) -> list[str]:
        """The job's ``srun`` steps (``J.0``, ``J.1``...; not ``J.batch`` nor ``J.extern``)."""
        out = subprocess.run(["squeue", "--noheader", "--steps", f"--jobs={self.job_id}", "--format=%i"],
                             capture_output=True, text=True, env=tb.slurm_env(), timeout=30, check=True).stdout
        return [s for s in out.split() if s.partition(".")[0] == self.job_id and s.partition(".")[2].isdigit()]

    def running(self, command: str) -> list[str]:
        """Alice's processes on the session's node whose command line ends with ``command``
        (``ps -ww``: whole command lines, however long the apptainer argv before it)."""
        out = subprocess.run(harness.on_node(self.node, "ps", "-ww", "-u", ALICE, "-o", "args="),
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return [line.strip() for line in out.splitlines() if line.strip().endswith(command)]


class Bed:
    """One daemon at a time for this module, with direct streams on or off, and alice's session."""

    def __init__(self) -> None:
        self.broker: BrokerProcess | None = None
        self.direct = True
        self.live: Live | None = None

    def session(self, direct: bool = True) -> Live:
        if self.broker is None or self.direct != direct or self.broker.proc.poll() is not None:
            self.stop()
            self.broker = broker_with("", transfer_direct=direct,
                                      container_project_dir=MAPPED_PROJECT_DIR)  # from an empty state
            self.direct, self.live = direct, None
        if self.live is None:
            session = ensure_as(ALICE, PROJECT)["session"]
            node = wait_node(ALICE, session["id"])
            shown = sbroker_json(ALICE, "show", session["id"])
            live = Live(str(shown["job_id"]), str(node), shown["instance"], Path(shown["log_path"]))
            wait_for(lambda: live.status().get("pid"), 20, "the session agent's status file")
            self.live = live
        return self.live

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()
            self.broker = None


@pytest.fixture(scope="module")
def bed(cluster) -> Iterator[Bed]:
    holder = Bed()
    yield holder
    holder.stop()
    reset_state()


@pytest.fixture
def direct(bed) -> Live:
    """Alice's session with direct streams on (the default): its agent listens."""
    live = bed.session()
    assert live.status()["port"] > 0, live.status()
    return live


def direct_started(live: Live, since: int, count: int) -> list[dict]:
    """Exactly ``count`` commands started over direct streams since ``since`` (already logged:
    the agent logs ``command_started`` before the command can read or print anything)."""
    started = live.events("command_started", since)
    assert len(started) == count, started
    return started


def scp(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["scp", *tb.SSH_OPTS, *args], capture_output=True, timeout=120)


def remote(path: str | Path) -> str:
    return f"{ALICE}@{tb.SSH_HOST}:{path}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def alice_owns(path: Path) -> bool:
    return path.stat().st_uid == pwd.getpwnam(ALICE).pw_uid


def held_command(command: str) -> subprocess.Popen[bytes]:
    """``ssh alice COMMAND`` left running (the caller writes its stdin, or not)."""
    return subprocess.Popen(["ssh", *tb.SSH_OPTS, f"{ALICE}@{tb.SSH_HOST}", command],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    """Feed ``stdin``, close it, and wait: (status, stdout, stderr); a hung one is killed."""
    try:
        out, err = proc.communicate(stdin, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


# ----------------------------------------------------------------------------- 1. the path

def test_a_command_without_a_terminal_is_a_direct_stream_and_no_srun_step(direct):
    assert direct.numbered_steps() == []
    since = direct.offset()
    marker = f"held-{secrets.token_hex(4)}"
    proc = held_command(f"cat; echo {marker}")
    try:
        wait_for(lambda: direct.status().get("commands") == 1, 30,
                 lambda: f"the agent's status to count the running command ({direct.status()})")
        started = direct_started(direct, since, 1)[0]
        assert started["argv0"] == "apptainer"

        # The process the agent forked runs this command in the session's instance (read once
        # it has exec'd apptainer: right after the fork it is still a copy of the agent).
        def cmdline() -> list[bytes]:
            argv = subprocess.run(harness.on_node(direct.node, "cat", f"/proc/{started['pid']}/cmdline"),
                                  capture_output=True, timeout=30).stdout.split(b"\0")
            return argv if f"instance://{direct.instance}".encode() in argv else []

        argv = wait_for(cmdline, 10, "the agent's command to exec apptainer")
        assert argv[-4:] == [b"/bin/bash", b"-c", f"cat; echo {marker}".encode(), b""], argv
        # While it runs, the job has no step for it: its stdio is not srun's.
        assert direct.numbered_steps() == []
    finally:
        status, out, err = finish(proc, b"through the agent\n")
    assert (status, out, err) == (0, f"through the agent\n{marker}\n".encode(), b"")
    assert direct.wait_event("command_exited", since, started["pid"], 10)["status"] == 0
    wait_for(lambda: direct.status().get("commands") == 0, 10, "the agent's status to count no command")


# ----------------------------------------------------------------------------- 2. scp and the shell

def typed_in_a_login(command: str) -> bytes:
    """What ``command`` prints when typed into an interactive login (``ssh -tt``: ``srun --pty``
    to the agent's pty, not a direct stream), ``\\r\\n`` made ``\\n``. The shell's working
    directory is not the point: callers give absolute paths."""
    argv = tb.ssh_command(ALICE, tty=True)
    child = pexpect.spawn(argv[0], argv[1:], timeout=60, dimensions=(24, 500))
    try:
        child.expect([rb"\$ ", rb"# "], timeout=120)
        tag = secrets.token_hex(4)
        child.send(f"echo B{tag}''X; {command}; echo E{tag}''X\r".encode())  # the echo of the line never matches
        child.expect(f"B{tag}X\r\n".encode())
        child.expect(f"E{tag}X\r\n".encode())
        out = child.before
        child.send(b"exit\r")
        child.expect(pexpect.EOF)
        return out.replace(b"\r\n", b"\n")
    finally:
        child.close(force=True)


@pytest.mark.parametrize("legacy", [False, True], ids=["sftp-protocol", "legacy-O"])
def test_scp_and_the_interactive_shell_see_each_others_files_at_once(direct, tmp_path, legacy):
    flags = ["-O"] if legacy else []
    tag = f"{'O' if legacy else 's'}-{secrets.token_hex(3)}"
    uploaded, made = HOME / f"direct-up-{tag}.bin", HOME / f"direct-made-{tag}.bin"
    payload = os.urandom(4 * MIB + 12345)
    (tmp_path / "up.bin").write_bytes(payload)
    try:
        since = direct.offset()
        up = scp(*flags, str(tmp_path / "up.bin"), remote(uploaded.name))  # relative: the home
        assert up.returncode == 0, up.stderr
        direct_started(direct, since, 1)
        assert uploaded.read_bytes() == payload and alice_owns(uploaded)

        # At once, in the interactive shell: scp's file at the same path; the shell writes one.
        out = typed_in_a_login(f"sha256sum {uploaded}; head -c {3 * MIB + 777} /dev/urandom > {made}; "
                               f"sha256sum {made}").decode()
        [up_sum, up_path, made_sum, made_path] = out.split()
        assert (up_sum, up_path, made_path) == (sha256(payload), str(uploaded), str(made)), out

        # Written in the shell, fetched byte-identical at once.
        since = direct.offset()
        down = scp(*flags, remote(made), str(tmp_path / "down.bin"))
        assert down.returncode == 0, down.stderr
        direct_started(direct, since, 1)
        data = (tmp_path / "down.bin").read_bytes()
        assert (len(data), sha256(data)) == (3 * MIB + 777, made_sum)
    finally:
        uploaded.unlink(missing_ok=True)
        made.unlink(missing_ok=True)


@pytest.mark.parametrize("tool", ["sftp", "rsync"])
def test_sftp_and_rsync_take_the_direct_stream_too(direct, tmp_path, tool):
    payload = os.urandom(2 * MIB + 1)
    (tmp_path / "up.bin").write_bytes(payload)
    target = HOME / f"direct-{tool}-{secrets.token_hex(3)}.bin"
    if tool == "sftp":
        batch = tmp_path / "batch"
        batch.write_text(f"put {tmp_path / 'up.bin'} {target}\nget {target} {tmp_path / 'down.bin'}\n")
        argvs = [["sftp", *tb.SSH_OPTS, "-b", str(batch), f"{ALICE}@{tb.SSH_HOST}"]]
    else:
        rsh = " ".join(["ssh", *tb.SSH_OPTS])
        argvs = [["rsync", "-e", rsh, str(tmp_path / "up.bin"), remote(target)],
                 ["rsync", "-e", rsh, remote(target), str(tmp_path / "down.bin")]]
    try:
        since = direct.offset()
        for argv in argvs:
            r = subprocess.run(argv, capture_output=True, timeout=120)
            assert r.returncode == 0, r.stderr
        direct_started(direct, since, len(argvs))  # one command (one ssh session) each
        assert target.read_bytes() == payload and alice_owns(target)
        assert (tmp_path / "down.bin").read_bytes() == payload
        assert direct.numbered_steps() == []
    finally:
        target.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- 3. mapped paths

def test_scp_to_a_path_the_container_maps_elsewhere_writes_the_host_file_it_maps(direct, tmp_path):
    inside = f"/home/{ALICE}/proj/{PROJECT}"                                          # the container's path
    mapped = Path(MAPPED_PROJECT_DIR.format(user=ALICE, project=PROJECT))             # the host dir bound there
    unmapped = Path(inside)                                                           # the same path on the host
    name, other = f"mapped-{secrets.token_hex(4)}.bin", f"hostside-{secrets.token_hex(4)}.bin"
    payload, host_payload = os.urandom(2 * MIB + 3), os.urandom(MIB + 5)
    (tmp_path / "up.bin").write_bytes(payload)
    try:
        since = direct.offset()
        up = scp(str(tmp_path / "up.bin"), remote(f"{inside}/{name}"))
        assert up.returncode == 0, up.stderr
        direct_started(direct, since, 1)
        assert (mapped / name).read_bytes() == payload and alice_owns(mapped / name)
        assert not (unmapped / name).exists()  # scp has exited: its file is complete where it went
        r = ssh(ALICE, f"sha256sum {inside}/{name}")
        assert r.stdout.split() == [sha256(payload).encode(), f"{inside}/{name}".encode()], r.stderr

        # The other way: a file put in the mapped host dir is fetched from the container's path.
        (mapped / other).write_bytes(host_payload)
        down = scp(remote(f"{inside}/{other}"), str(tmp_path / "down.bin"))
        assert down.returncode == 0, down.stderr
        assert (tmp_path / "down.bin").read_bytes() == host_payload
    finally:
        (mapped / name).unlink(missing_ok=True)
        (mapped / other).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- 4. node-local paths

def test_scp_to_tmp_lands_in_the_sessions_tmp_on_its_node_never_the_login_nodes(direct, tmp_path):
    """The session's /tmp is its instance's own (``--containall``: a tmpfs on the compute
    node). scp's file is there for the session's next command, which runs on that node, and
    the login node's /tmp has no such file."""
    path = f"/tmp/direct-node-local-{secrets.token_hex(4)}.bin"
    payload = os.urandom(MIB + 99)
    (tmp_path / "up.bin").write_bytes(payload)
    try:
        since = direct.offset()
        up = scp(str(tmp_path / "up.bin"), remote(path))
        assert up.returncode == 0, up.stderr
        direct_started(direct, since, 1)
        r = ssh(ALICE, f"sha256sum {path}; hostname")
        assert r.stdout.split() == [sha256(payload).encode(), path.encode(), direct.node.encode()], r.stderr
        assert not Path(path).exists()  # scp has exited: it wrote where it was going to
    finally:
        ssh(ALICE, f"rm -f {path}")


# ----------------------------------------------------------------------------- 5. streams intact

def test_stdout_stderr_and_exit_status_are_exact(direct):
    since = direct.offset()
    r = ssh(ALICE, "printf out; printf err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out", b"err")
    started = direct_started(direct, since, 1)[0]
    assert direct.wait_event("command_exited", since, started["pid"], 10)["status"] == 7


def test_large_stdin_is_byte_exact(direct):
    data = os.urandom(50 * MIB)
    since = direct.offset()
    r = ssh(ALICE, "sha256sum; exit 5", input=data, timeout=180)
    assert (r.returncode, r.stdout, r.stderr) == (5, f"{sha256(data)}  -\n".encode(), b"")
    direct_started(direct, since, 1)


def test_large_binary_stdout_and_stderr_are_byte_exact_and_apart(direct):
    """20 MiB of stdout and 3 MiB of stderr at the same time (more than the agent buffers for
    a slow reader); their sums come last on stderr."""
    d = f"/tmp/direct-out-{secrets.token_hex(4)}"
    r = ssh(ALICE, f"mkdir {d} && head -c {20 * MIB} /dev/urandom > {d}/so && head -c {3 * MIB} /dev/urandom "
                   f"> {d}/se && sha256sum {d}/so {d}/se > {d}/sums && {{ cat {d}/se >&2 & cat {d}/so; wait; }} "
                   f"&& cat {d}/sums >&2; status=$?; rm -rf {d}; exit $status", timeout=180)
    assert r.returncode == 0, r.stderr[3 * MIB:]
    err, sums = r.stderr[:3 * MIB], r.stderr[3 * MIB:].decode().split()
    assert sums == [sha256(r.stdout), f"{d}/so", sha256(err), f"{d}/se"]
    assert len(r.stdout) == 20 * MIB


# ----------------------------------------------------------------------------- 6. hanging up

@dataclass
class Sleeper:
    """``ssh alice 'sleep N'`` (N unique to it) running over a direct stream."""

    command: str
    since: int
    pid: int   # the agent's child for it (apptainer exec ...)
    ssh: subprocess.Popen[bytes]

    def login(self) -> int:
        """The pid of its ``sbroker login`` on this login node (0 once gone): the process
        whose environment has ``SSH_ORIGINAL_COMMAND=sleep N``."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if f"SSH_ORIGINAL_COMMAND={self.command}".encode() in environ and b"broker.cli" in cmdline:
                return int(entry.name)
        return 0


@contextmanager
def sleeping(live: Live) -> Iterator[Sleeper]:
    """A :class:`Sleeper` once it runs on the node; whatever is left of it is ended afterwards."""
    command = f"sleep {6000 + secrets.randbelow(3000)}"
    since = live.offset()
    proc = held_command(command)
    sleeper = None
    try:
        wait_for(lambda: live.running(command), 30, f"`{command}` running on {live.node}")
        sleeper = Sleeper(command, since, direct_started(live, since, 1)[0]["pid"], proc)
        yield sleeper
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = sleeper.login() if sleeper else 0
        if left:
            os.kill(left, signal.SIGKILL)


def assert_hung_up_and_gone(live: Live, sleeper: Sleeper) -> None:
    """The agent hung the command up because its login's stream closed; it ended by SIGHUP
    and nothing of it is left on the node."""
    hung = live.wait_event("command_hangup", sleeper.since, sleeper.pid, 15)
    assert hung["why"] == "the client's connection closed"
    assert live.wait_event("command_exited", sleeper.since, sleeper.pid, 15)["status"] == 128 + signal.SIGHUP
    wait_for(lambda: not live.running(sleeper.command), 10,
             lambda: f"`{sleeper.command}` gone from {live.node} ({live.running(sleeper.command)})")
    wait_for(lambda: live.status().get("commands") == 0, 10, "the agent's status to count no command")


def test_a_hangup_signal_to_the_login_hangs_the_command_up(direct):
    """A SIGHUP to the login (an administrator's ``kill -HUP``, or SIGTERM at shutdown): the
    login closes its control stream, the agent hangs the command up, and the user's ssh ends
    with 255 and nothing on stdout."""
    with sleeping(direct) as sleeper:
        login = wait_for(sleeper.login, 10, "the command's sbroker login process")
        os.kill(login, signal.SIGHUP)
        assert_hung_up_and_gone(direct, sleeper)
        status, out, err = finish(sleeper.ssh)
        assert (status, out) == (255, b""), err


def test_a_login_that_dies_hangs_its_command_up(direct):
    """The login process is killed outright (the OOM killer, ``kill -9``: no handler of its own
    runs): the kernel closes its streams, and that alone makes the agent hang the command up."""
    with sleeping(direct) as sleeper:
        login = wait_for(sleeper.login, 10, "the command's sbroker login process")
        os.kill(login, signal.SIGKILL)
        assert_hung_up_and_gone(direct, sleeper)


def test_a_lost_ssh_client_hangs_the_command_up(direct):
    """The user's ssh client dies (laptop closed, network gone; here ``kill -9``). sshd sends a
    command without a terminal no signal: it exits, and the reading end of the login's stdout
    closes. The login takes that as the hang-up, so the command does not run on forever."""
    with sleeping(direct) as sleeper:
        wait_for(sleeper.login, 10, "the command's sbroker login process")
        sleeper.ssh.kill()
        sleeper.ssh.wait(30)
        assert_hung_up_and_gone(direct, sleeper)
        wait_for(lambda: sleeper.login() == 0, 15, "the command's sbroker login to exit")


# ----------------------------------------------------------------------------- 1b. direct = false

def test_with_direct_off_the_same_command_is_an_srun_step(bed):
    live = bed.session(direct=False)
    assert live.status()["port"] == 0  # the agent was not even asked to listen
    assert live.numbered_steps() == []
    marker = f"held-{secrets.token_hex(4)}"
    proc = held_command(f"cat; echo {marker}")
    try:
        steps = wait_for(live.numbered_steps, 60, "an srun step for the command")
        assert len(steps) == 1, steps
    finally:
        status, out, err = finish(proc, b"through srun\n")
    assert (status, out, err) == (0, f"through srun\n{marker}\n".encode(), b"")
    # The agent started nothing itself and has no key: the command never touched a stream.
    assert live.events("command_started") == []
    assert not live.log.with_name(f"{live.instance}.agent.key").exists()
