"""Transfers on shared storage are served on the login node, and only those (``[transfer] login_paths``).

Through the real sshd (ForceCommand ``sbroker login``), real SLURM and the session agent on
the compute node, with ``login_paths = ["/home"]``: scp (both modes), sftp, rsync and the
``cat`` pipe idioms of files in alice's home run as the login node's own server, with the
right bytes, and see the session's files at once (both ways); node-local paths (the session's
``/tmp``) are never served from the login node: sftp is refused there by the kernel, scp -O,
rsync and cat go to the allocation and bring the session's bytes, and a path that normalises
out of the home goes there too; a symlink in the home out to ``/tmp`` is refused; a project
dir the container mounts elsewhere sends every transfer to the allocation, where the file
lands in the host dir the container shows.

Where a command ran is read from both sides: the broker's ``command_routed`` line
(``where``: login or allocation) in its log, and the agent's ``command_started`` in the job
log (none for the login side, one for the allocation).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster import config as tb
from tests.e2e.test_direct_streams import (HOME, MAPPED_PROJECT_DIR, MIB, PROJECT, Live, alice_owns, direct_started,
                                           remote, scp, sha256)
from tests.e2e.test_login_side_no_session import routed as routed_events
from tests.hostile._peer import broker_with
from tests.integration.conftest import ensure_as, sbroker_json, wait_node
from tests.integration.daemon import LOG_PATH, BrokerProcess, reset_state
from tests.waiting import wait_for

from .conftest import ALICE, ssh

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

#: The daemons of this module and tests/hostile/test_login_side_confinement.py, by name.
CONFIGS: dict[str, dict[str, object]] = {
    "shared": {"transfer_login_paths": ["/home"]},
    "mapped": {"transfer_login_paths": ["/home"], "container_project_dir": MAPPED_PROJECT_DIR},
    "off": {},
}
RSH = " ".join(["ssh", *tb.SSH_OPTS])


# ----------------------------------------------------------------------------- sessions and routes

def live_session(user: str) -> Live:
    """``user``'s session under the running daemon, once its agent listens for direct streams."""
    session = ensure_as(user, PROJECT)["session"]
    node = wait_node(user, session["id"])
    shown = sbroker_json(user, "show", session["id"])
    live = Live(str(shown["job_id"]), str(node), shown["instance"], Path(shown["log_path"]))
    wait_for(lambda: live.status().get("port"), 20, lambda: f"{user}'s agent to listen ({live.status()})")
    return live


class Bed:
    """One daemon at a time (a config of :data:`CONFIGS`) and its users' sessions."""

    def __init__(self) -> None:
        self.broker: BrokerProcess | None = None
        self.config = ""
        self.lives: dict[str, Live] = {}

    def session(self, config: str, user: str = ALICE) -> Live:
        if self.broker is None or self.config != config or self.broker.proc.poll() is not None:
            self.stop()
            self.broker = broker_with("", **CONFIGS[config])  # from an empty state
            self.config, self.lives = config, {}
        if user not in self.lives:
            self.lives[user] = live_session(user)
        return self.lives[user]

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()
            self.broker = None


@dataclass(frozen=True)
class Mark:
    """Where both logs stood before a command: the broker log's size, the agent's line count."""

    log: int
    agent: int


def mark(live: Live) -> Mark:
    return Mark(LOG_PATH.stat().st_size, live.offset())


def routed(since: int, user: str) -> list[tuple[str, str]]:
    """(where, program) of the broker's ``command_routed`` lines about ``user`` after byte ``since``."""
    return [(e["where"], e["program"]) for e in routed_events(since) if e["user"] == user]


def on_login(live: Live, since: Mark, program: str, count: int = 1, user: str = ALICE) -> None:
    """``count`` commands since ``since`` ran as the login node's ``program``: the broker said
    so (before its reply, so before the command ran), and the agent started nothing."""
    assert routed(since.log, user) == [("login", program)] * count
    assert live.events("command_started", since.agent) == []


def in_allocation(live: Live, since: Mark, count: int = 1, user: str = ALICE) -> None:
    """``count`` commands since ``since`` went to the allocation, each a direct stream to the agent."""
    assert routed(since.log, user) == [("allocation", "")] * count
    direct_started(live, since.agent, count)


def at(user: str, path: str | Path) -> str:
    return f"{user}@{tb.SSH_HOST}:{path}"


def sftp(user: str, *commands: str) -> subprocess.CompletedProcess[bytes]:
    """``sftp -b -`` as ``user`` with ``commands`` (the batch stops at the first that fails)."""
    return subprocess.run(["sftp", *tb.SSH_OPTS, "-b", "-", f"{user}@{tb.SSH_HOST}"],
                          input="".join(f"{c}\n" for c in commands).encode(), capture_output=True, timeout=120)


def rsync(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["rsync", "-e", RSH, *args], capture_output=True, timeout=120)


def in_session(live: Live, command: str) -> bytes:
    """What a generic ``ssh alice COMMAND`` prints: it runs in the container, in the allocation."""
    since = mark(live)
    r = ssh(ALICE, command)
    assert r.returncode == 0, r.stderr
    in_allocation(live, since)
    return r.stdout


def session_sha(live: Live, path: str | Path) -> str:
    """The sha256 of ``path`` as the session sees it."""
    [digest, name] = in_session(live, f"sha256sum {path}").decode().split()
    assert name == str(path)
    return digest


def lines(tag: str, count: int) -> bytes:
    """What ``printf 'TAG-%05d\\n' $(seq 1 COUNT)`` writes."""
    return "".join(f"{tag}-{i:05d}\n" for i in range(1, count + 1)).encode()


def write_in_session(live: Live, path: str | Path, tag: str, count: int) -> bytes:
    in_session(live, f"printf '{tag}-%05d\\n' $(seq 1 {count}) > {path}")
    return lines(tag, count)


def alice_ids() -> tuple[int, int]:
    """(uid, gid) of alice: for what root makes in her home on her behalf."""
    st = HOME.stat()
    return st.st_uid, st.st_gid


def decoy(path: str | Path) -> bytes:
    """A world-readable file root puts at ``path`` on the login node: what must never come back."""
    data = f"LOGIN NODE {path} {secrets.token_hex(8)}\n".encode()
    Path(path).write_bytes(data)
    os.chmod(path, 0o644)
    return data


@pytest.fixture(scope="module")
def bed(cluster) -> Iterator[Bed]:
    holder = Bed()
    yield holder
    holder.stop()
    reset_state()


@pytest.fixture
def shared(bed) -> Live:
    """Alice's session under ``login_paths = ["/home"]``."""
    return bed.session("shared")


@pytest.fixture
def mapped(bed) -> Live:
    """Alice's session under ``login_paths = ["/home"]`` with the project dir mounted elsewhere."""
    return bed.session("mapped")


# ----------------------------------------------------------------------------- 1. files in the home

@pytest.mark.parametrize("flags, program", [([], "sftp-server"), (["-O"], "scp")], ids=["sftp-protocol", "legacy-O"])
def test_scp_up_and_down_runs_on_the_login_node_and_sees_the_sessions_files_at_once(shared, tmp_path, flags,
                                                                                       program):
    tag = f"login-scp-{'O' if flags else 's'}-{secrets.token_hex(3)}"
    uploaded, made = HOME / f"{tag}-up.bin", HOME / f"{tag}-made.txt"
    payload = os.urandom(MIB + 4321)
    (tmp_path / "up.bin").write_bytes(payload)
    try:
        since = mark(shared)
        up = scp(*flags, str(tmp_path / "up.bin"), remote(uploaded.name))  # relative: the home
        assert up.returncode == 0, up.stderr
        on_login(shared, since, program)
        assert uploaded.read_bytes() == payload
        assert alice_owns(uploaded)
        # At once in the session, at the same path.
        assert session_sha(shared, uploaded) == sha256(payload)

        # Written in the session, fetched from the login side at once.
        written = write_in_session(shared, made, tag, 20000)
        since = mark(shared)
        down = scp(*flags, remote(made), str(tmp_path / "down.txt"))
        assert down.returncode == 0, down.stderr
        on_login(shared, since, program)
        assert (tmp_path / "down.txt").read_bytes() == written
    finally:
        uploaded.unlink(missing_ok=True)
        made.unlink(missing_ok=True)


def test_sftp_put_and_get_run_on_the_login_node(shared, tmp_path):
    target = HOME / f"login-sftp-{secrets.token_hex(3)}.bin"
    payload = os.urandom(MIB - 17)
    (tmp_path / "up.bin").write_bytes(payload)
    try:
        since = mark(shared)
        r = sftp(ALICE, f"put {tmp_path / 'up.bin'} {target.name}", f"get {target} {tmp_path / 'down.bin'}")
        assert r.returncode == 0, r.stderr
        on_login(shared, since, "sftp-server")  # one ssh session for both
        assert target.read_bytes() == payload
        assert alice_owns(target)
        assert (tmp_path / "down.bin").read_bytes() == payload
        assert session_sha(shared, target) == sha256(payload)
    finally:
        target.unlink(missing_ok=True)


def test_rsync_up_and_down_run_on_the_login_node(shared, tmp_path):
    tag = f"login-rsync-{secrets.token_hex(3)}"
    target, made = HOME / f"{tag}-up.bin", HOME / f"{tag}-made.txt"
    payload = os.urandom(MIB + 1)
    (tmp_path / "up.bin").write_bytes(payload)
    try:
        since = mark(shared)
        up = rsync(str(tmp_path / "up.bin"), at(ALICE, target.name))
        assert up.returncode == 0, up.stderr
        on_login(shared, since, "rsync")
        assert target.read_bytes() == payload
        assert alice_owns(target)
        assert session_sha(shared, target) == sha256(payload)

        written = write_in_session(shared, made, tag, 5000)
        since = mark(shared)
        down = rsync(at(ALICE, made), str(tmp_path / "down.txt"))
        assert down.returncode == 0, down.stderr
        on_login(shared, since, "rsync")
        assert (tmp_path / "down.txt").read_bytes() == written
    finally:
        target.unlink(missing_ok=True)
        made.unlink(missing_ok=True)


def test_the_cat_pipe_idioms_run_on_the_login_node_with_cats_own_status_and_message(shared):
    name = f"login-cat-{secrets.token_hex(3)}.bin"
    payload, more = os.urandom(300 * 1024 + 3), os.urandom(4097)
    try:
        since = mark(shared)
        r = ssh(ALICE, f"cat > {name}", input=payload)
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
        on_login(shared, since, "cat")
        assert (HOME / name).read_bytes() == payload
        assert alice_owns(HOME / name)

        since = mark(shared)
        r = ssh(ALICE, f"cat >> {name}", input=more)
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
        on_login(shared, since, "cat")
        assert session_sha(shared, HOME / name) == sha256(payload + more)

        since = mark(shared)
        r = ssh(ALICE, f"cat {name}")
        assert (r.returncode, r.stdout, r.stderr) == (0, payload + more, b"")
        on_login(shared, since, "cat")

        since = mark(shared)
        r = ssh(ALICE, f"cat no-such-{name}")
        missing = f"cat: no-such-{name}: No such file or directory\n".encode()  # what bash's cat says
        assert (r.returncode, r.stdout, r.stderr) == (1, b"", missing)
        on_login(shared, since, "cat")
    finally:
        (HOME / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- 2. node-local paths

@dataclass
class TmpFile:
    """A file at one path in the session's /tmp (its bytes) and on the login node (a decoy)."""

    path: str
    session: bytes
    login: bytes


@pytest.fixture
def tmp_file(shared) -> Iterator[TmpFile]:
    tag = f"login-tmp-{secrets.token_hex(3)}"
    path = f"/tmp/{tag}"
    written = write_in_session(shared, path, tag, 3000)
    try:
        yield TmpFile(path, written, decoy(path))
    finally:
        Path(path).unlink(missing_ok=True)
        ssh(ALICE, f"rm -f {path}")


def test_sftp_and_scp_of_the_sessions_tmp_are_refused_and_never_bring_the_login_nodes_file(shared, tmp_file,
                                                                                             tmp_path):
    since = mark(shared)
    r = sftp(ALICE, f"get {tmp_file.path} {tmp_path / 'sftp.out'}")
    assert (r.returncode, r.stderr) == (1, f'File "{tmp_file.path}" not found.\r\n'.encode())
    on_login(shared, since, "sftp-server")
    assert not (tmp_path / "sftp.out").exists()

    since = mark(shared)
    r = scp(at(ALICE, tmp_file.path), str(tmp_path / "scp.out"))
    assert (r.returncode, r.stderr) == (1, f'scp: {tmp_file.path}: No such file or directory\r\n'.encode())
    on_login(shared, since, "sftp-server")
    assert not (tmp_path / "scp.out").exists()


@pytest.mark.parametrize("tool", ["scp-O", "rsync", "cat"])
def test_scp_O_rsync_and_cat_of_the_sessions_tmp_run_in_the_allocation_and_bring_its_bytes(shared, tmp_file,
                                                                                             tmp_path, tool):
    out = tmp_path / "out"
    since = mark(shared)
    if tool == "scp-O":
        r = scp("-O", at(ALICE, tmp_file.path), str(out))
    elif tool == "rsync":
        r = rsync(at(ALICE, tmp_file.path), str(out))
    else:
        r = ssh(ALICE, f"cat {tmp_file.path}")
        out.write_bytes(r.stdout)
    assert r.returncode == 0, r.stderr
    in_allocation(shared, since)
    assert out.read_bytes() == tmp_file.session


@pytest.mark.parametrize("written_as", ["/tmp/{name}", "{xfer}/../../../tmp/{name}"], ids=["absolute", "dotdot"])
def test_cat_into_a_path_out_of_the_home_lands_in_the_sessions_tmp_not_the_login_nodes(shared, written_as):
    name = f"login-cat-into-{secrets.token_hex(3)}"
    path = f"/tmp/{name}"
    payload = os.urandom(64 * 1024 + 1)
    xfer = HOME / f"xfer-{name}"  # bash's open in the session walks through it
    xfer.mkdir()
    os.chown(xfer, *alice_ids())
    try:
        since = mark(shared)
        r = ssh(ALICE, f"cat > {written_as.format(xfer=xfer.name, name=name)}", input=payload)
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
        in_allocation(shared, since)
        assert session_sha(shared, path) == sha256(payload)
        assert not Path(path).exists()  # the command has exited: it wrote where it was going to
    finally:
        ssh(ALICE, f"rm -f {path}")
        xfer.rmdir()


# ----------------------------------------------------------------------------- 3. a symlink out

def test_a_symlink_in_the_home_out_to_tmp_is_refused_on_the_login_node(shared, tmp_file, tmp_path):
    link = HOME / f"login-out-{secrets.token_hex(3)}"
    name = Path(tmp_file.path).name
    os.symlink("/tmp", link)
    os.lchown(link, *alice_ids())
    try:
        since = mark(shared)
        r = sftp(ALICE, f"get {link.name}/{name} {tmp_path / 'sftp.out'}")
        assert (r.returncode, r.stderr) == (1, f'File "{link}/{name}" not found.\r\n'.encode())
        on_login(shared, since, "sftp-server")
        assert not (tmp_path / "sftp.out").exists()

        since = mark(shared)
        r = sftp(ALICE, f"ls {link.name}/")
        assert (r.returncode, r.stderr) == (1, f'Can\'t ls: "{link}/" not found\r\n'.encode())
        on_login(shared, since, "sftp-server")
        assert name.encode() not in r.stdout

        since = mark(shared)
        r = ssh(ALICE, f"cat {link.name}/{name}")
        assert (r.returncode, r.stdout, r.stderr) == (1, b"", f"cat: {link.name}/{name}: No such file or directory\n".encode())
        on_login(shared, since, "cat")

        since = mark(shared)
        r = scp("-O", remote(f"{link.name}/{name}"), str(tmp_path / "scp.out"))
        assert (r.returncode, r.stderr) == (1, f"scp: {link.name}/{name}: No such file or directory\n".encode())
        on_login(shared, since, "scp")
        assert not (tmp_path / "scp.out").exists()
    finally:
        link.unlink()


# ----------------------------------------------------------------------------- 4. mapped elsewhere

@pytest.mark.parametrize("tool", ["sftp", "scp", "scp-O"])
def test_a_project_dir_mounted_elsewhere_sends_transfers_to_the_allocation_where_it_is_mounted(mapped, tmp_path,
                                                                                                tool):
    inside = HOME / "proj" / PROJECT                                          # the container's path
    host = Path(MAPPED_PROJECT_DIR.format(user=ALICE, project=PROJECT))       # the host dir bound there
    inside.mkdir(parents=True, exist_ok=True)  # on the host too: a login-side write would succeed there
    os.chown(inside, *alice_ids())
    name = f"login-mapped-{tool}-{secrets.token_hex(3)}.bin"
    payload = os.urandom(MIB // 2 + 5)
    (tmp_path / "up.bin").write_bytes(payload)
    relative = f"proj/{PROJECT}/{name}"
    try:
        since = mark(mapped)
        if tool == "sftp":
            r = sftp(ALICE, f"put {tmp_path / 'up.bin'} {relative}")
        else:
            r = scp(*(["-O"] if tool == "scp-O" else []), str(tmp_path / "up.bin"), remote(relative))
        assert r.returncode == 0, r.stderr
        in_allocation(mapped, since)
        assert (host / name).read_bytes() == payload
        assert alice_owns(host / name)
        assert not (inside / name).exists()
    finally:
        (host / name).unlink(missing_ok=True)
