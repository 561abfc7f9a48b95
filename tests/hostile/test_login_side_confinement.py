"""The login-side transfer server is confined to the session's trees (``[transfer] login_paths``).

With ``login_paths = ["/home"]`` a transfer in the home runs as the login node's own server
(sftp-server, scp, rsync, cat), as the user, in a private view of the file system that holds
only the home (broker.mountview), confined there by Landlock. Here alice and
bob try to step out of it: sftp ``ls``, ``get``, ``put``, ``chmod``, ``rm``, ``rename``, ``ln``
and ``ls -l`` of login-node files outside the home are refused; bob cannot read or write alice's files through his server
even where plain permissions would let him; ``..`` paths, a hand-made scp stream, and a
symlink planted in the home never make scp or rsync write on the login node outside the home.
With ``login_paths`` unset (the default) every transfer goes to the allocation as before.

The route of each command is read from the broker's ``command_routed`` line and the agent's
``command_started`` lines (:mod:`tests.e2e.test_login_side_transfers`).
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import config as tb
from tests.e2e.conftest import ssh
from tests.e2e.test_direct_streams import HOME, MIB, direct_started, remote, scp, sha256
# bed and shared are the e2e module's fixtures: one daemon and one session for both modules' tests
from tests.e2e.test_login_side_transfers import (alice_ids, at, bed, in_allocation, mark, on_login, routed,  # noqa: F401
                                                 rsync, session_sha, sftp, shared)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ALICE, BOB = tb.USERS


def login_tmp(tag: str) -> Path:
    """A path in the login node's /tmp, unique to the test; removed by the caller."""
    return Path(f"/tmp/login-hostile-{tag}-{secrets.token_hex(3)}")


# ----------------------------------------------------------------------------- sftp out of the home

@pytest.fixture
def alices_login_tmp_file() -> Iterator[Path]:
    """A file of alice's in the login node's /tmp, mode 0600: plain permissions let her do
    anything to it; her login-side server must not."""
    path = login_tmp("own")
    path.write_bytes(b"alice's file on the login node\n")
    os.chown(path, *alice_ids())
    os.chmod(path, 0o600)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sftp_cannot_list_or_read_etc(shared, tmp_path):
    since = mark(shared)
    r = sftp(ALICE, "ls /etc")
    assert (r.returncode, r.stderr) == (1, b'remote readdir("/etc/"): Permission denied\r\n')
    on_login(shared, since, "sftp-server")
    assert b"passwd" not in r.stdout

    since = mark(shared)
    r = sftp(ALICE, f"get /etc/hostname {tmp_path / 'hostname'}")
    assert (r.returncode, r.stderr) == (1, b'File "/etc/hostname" not found.\r\n')
    on_login(shared, since, "sftp-server")
    assert not (tmp_path / "hostname").exists()


def test_sftp_cannot_put_into_the_login_nodes_tmp(shared, tmp_path):
    target = login_tmp("put")
    (tmp_path / "x").write_bytes(b"x" * 1000)
    try:
        since = mark(shared)
        r = sftp(ALICE, f"put {tmp_path / 'x'} {target}")
        assert (r.returncode, r.stderr) == (1, f'dest open "{target}": No such file or directory\r\n'.encode())
        on_login(shared, since, "sftp-server")
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_sftp_cannot_chmod_a_file_outside_the_home(shared, alices_login_tmp_file):
    since = mark(shared)
    r = sftp(ALICE, f"chmod 777 {alices_login_tmp_file}")
    on_login(shared, since, "sftp-server")
    refused = f'remote setstat "{alices_login_tmp_file}": No such file or directory\r\n'.encode()
    assert (r.returncode, r.stderr, oct(mode(alices_login_tmp_file))) == (1, refused, oct(0o600))


def test_sftp_cannot_remove_rename_or_link_a_file_outside_the_home(shared, alices_login_tmp_file):
    since = mark(shared)
    r = sftp(ALICE, f"rm {alices_login_tmp_file}")
    assert (r.returncode, r.stderr) == (1, f"remote delete {alices_login_tmp_file}: No such file or directory\r\n".encode())
    on_login(shared, since, "sftp-server")

    moved = HOME / f"moved-{alices_login_tmp_file.name}"
    since = mark(shared)
    r = sftp(ALICE, f"rename {alices_login_tmp_file} {moved}")
    assert (r.returncode, r.stderr) == (
        1, f'remote rename "{alices_login_tmp_file}" to "{moved}": No such file or directory\r\n'.encode())
    on_login(shared, since, "sftp-server")

    since = mark(shared)
    r = sftp(ALICE, f"ln {alices_login_tmp_file} {moved}")  # a hard link into the home
    # Outside the trees nothing exists in the server's view: there is nothing to link.
    assert (r.returncode, r.stderr) == (
        1, f'remote link "{alices_login_tmp_file}" to "{moved}": No such file or directory\r\n'.encode())
    on_login(shared, since, "sftp-server")
    assert alices_login_tmp_file.read_bytes() == b"alice's file on the login node\n"
    assert not moved.exists()


def test_sftp_shows_nothing_of_a_login_node_file_outside_the_home(shared, alices_login_tmp_file):
    """``ls -l`` of a /tmp path: the session's /tmp is another directory on another node, so
    the login node's file (its size, its mode) is the wrong machine's answer."""
    alices_login_tmp_file.write_bytes(b"z" * 7777)
    since = mark(shared)
    r = sftp(ALICE, f"ls -l {alices_login_tmp_file}")
    on_login(shared, since, "sftp-server")
    assert (r.returncode, b"7777" in r.stdout) == (1, False), (r.stdout, r.stderr)


# ----------------------------------------------------------------------------- bob and alice

@pytest.fixture
def alices_open_dir(shared) -> Iterator[Path]:
    """A directory in alice's home that plain permissions would open to bob (home 0711, the
    directory 0777, a file 0666 in it), put back as it was afterwards."""
    home_mode = mode(HOME)
    folder = HOME / f"open-to-all-{secrets.token_hex(3)}"
    folder.mkdir()
    (folder / "f").write_bytes(b"alice's words\n")
    for path in (folder, folder / "f"):
        os.chown(path, *alice_ids())
    os.chmod(folder, 0o777)
    os.chmod(folder / "f", 0o666)
    os.chmod(HOME, 0o711)
    try:
        yield folder
    finally:
        os.chmod(HOME, home_mode)
        for path in sorted(folder.iterdir(), reverse=True):
            path.unlink()
        folder.rmdir()


def test_bob_cannot_read_or_write_alices_files_through_his_login_side_server(bed, alices_open_dir, tmp_path):
    bob = bed.session("shared", BOB)
    target, other = alices_open_dir / "f", alices_open_dir / "g"
    (tmp_path / "g").write_bytes(b"bob's words\n")

    since = mark(bob)
    r = sftp(BOB, f"get {target} {tmp_path / 'f'}")
    assert (r.returncode, r.stderr) == (1, f'File "{target}" not found.\r\n'.encode())
    on_login(bob, since, "sftp-server", user=BOB)
    assert not (tmp_path / "f").exists()

    since = mark(bob)
    r = sftp(BOB, f"put {tmp_path / 'g'} {other}")
    assert (r.returncode, r.stderr) == (1, f'dest open "{other}": No such file or directory\r\n'.encode())
    on_login(bob, since, "sftp-server", user=BOB)

    since = mark(bob)
    r = sftp(BOB, f"rm {target}")
    assert (r.returncode, r.stderr) == (1, f"remote delete {target}: No such file or directory\r\n".encode())
    on_login(bob, since, "sftp-server", user=BOB)

    # cat and scp -O name a path outside his trees: his allocation, where alice's home is not.
    since = mark(bob)
    r = ssh(BOB, f"cat {target}")
    assert (r.returncode, r.stdout) == (1, b""), r.stderr
    in_allocation(bob, since, user=BOB)

    since = mark(bob)
    r = scp("-O", str(tmp_path / "g"), at(BOB, other))
    assert r.returncode == 1, r.stderr
    in_allocation(bob, since, user=BOB)

    assert target.read_bytes() == b"alice's words\n"
    assert not other.exists()


# ----------------------------------------------------------------------------- writes out of the home

@pytest.mark.parametrize("tool", ["scp-O", "rsync"])
@pytest.mark.parametrize("form", ["../../tmp/{name}", "/home/{user}/../../tmp/{name}"], ids=["relative", "absolute"])
def test_dotdot_paths_out_of_the_home_go_to_the_allocation_and_never_write_on_the_login_node(shared, tmp_path,
                                                                                              tool, form):
    name = login_tmp(tool).name
    payload = os.urandom(MIB // 4 + 3)
    (tmp_path / "up").write_bytes(payload)
    dest = remote(form.format(user=ALICE, name=name))
    try:
        since = mark(shared)
        r = scp("-O", str(tmp_path / "up"), dest) if tool == "scp-O" else rsync(str(tmp_path / "up"), dest)
        assert r.returncode == 0, r.stderr
        in_allocation(shared, since)
        assert session_sha(shared, f"/tmp/{name}") == sha256(payload)
        assert not Path("/tmp", name).exists()
    finally:
        ssh(ALICE, f"rm -f /tmp/{name}")
        Path("/tmp", name).unlink(missing_ok=True)


def test_a_hand_made_scp_stream_cannot_name_a_file_out_of_its_directory(shared):
    name = login_tmp("stream").name
    since = mark(shared)
    r = ssh(ALICE, "scp -t .", input=f"C0644 5 ../../tmp/{name}\nhello\0".encode())
    assert r.returncode == 1, r.stderr
    on_login(shared, since, "scp")
    assert f"unexpected filename: ../../tmp/{name}".encode() in r.stdout
    assert not Path("/tmp", name).exists()


@pytest.fixture
def planted_link() -> Iterator[Path]:
    """``~/out-…`` -> ``/tmp``, alice's own symlink in her home."""
    link = HOME / f"out-{secrets.token_hex(3)}"
    os.symlink("/tmp", link)
    os.lchown(link, *alice_ids())
    try:
        yield link
    finally:
        link.unlink()


@pytest.mark.parametrize("tool", ["scp-O", "rsync", "cat"])
def test_a_symlink_planted_in_the_home_does_not_let_a_write_reach_the_login_nodes_tmp(shared, planted_link,
                                                                                     tmp_path, tool):
    name = login_tmp(tool).name
    through = f"{planted_link.name}/{name}"
    payload = os.urandom(10000)
    (tmp_path / "up").write_bytes(payload)
    try:
        since = mark(shared)
        if tool == "scp-O":
            r = scp("-O", str(tmp_path / "up"), remote(through))
            assert (r.returncode, r.stderr) == (1, f"scp: {through}: No such file or directory\n".encode())
        elif tool == "rsync":
            r = rsync(str(tmp_path / "up"), remote(through))
            assert r.returncode == 3, r.stderr
            assert b"No such file or directory" in r.stderr
        else:
            r = ssh(ALICE, f"cat > {through}", input=payload)
            assert (r.returncode, r.stdout, r.stderr) == (1, b"", f"sbroker: {through}: No such file or directory\n".encode())
        on_login(shared, since, tool.removesuffix("-O"))
        assert not Path("/tmp", name).exists()
    finally:
        Path("/tmp", name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- login_paths off

def test_with_login_paths_off_every_transfer_goes_to_the_allocation(bed, tmp_path):
    off = bed.session("off")
    tag = f"off-{secrets.token_hex(3)}"
    payload = os.urandom(MIB // 2 + 1)
    (tmp_path / "up").write_bytes(payload)
    commands = [
        ("scp", lambda: scp(str(tmp_path / "up"), remote(f"{tag}-scp"))),
        ("scp-O", lambda: scp("-O", str(tmp_path / "up"), remote(f"{tag}-scp-O"))),
        ("sftp", lambda: sftp(ALICE, f"put {tmp_path / 'up'} {tag}-sftp")),
        ("rsync", lambda: rsync(str(tmp_path / "up"), remote(f"{tag}-rsync"))),
        ("cat", lambda: ssh(ALICE, f"cat > {tag}-cat", input=payload)),
    ]
    try:
        for tool, run in commands:
            since = mark(off)
            r = run()
            assert r.returncode == 0, (tool, r.stderr)
            direct_started(off, since.agent, 1)
            assert routed(since.log, ALICE) == []  # the route is not even asked
            assert (HOME / f"{tag}-{tool}").read_bytes() == payload

        since = mark(off)
        r = ssh(ALICE, f"cat {tag}-cat")
        assert (r.returncode, r.stdout, r.stderr) == (0, payload, b"")
        direct_started(off, since.agent, 1)
        assert routed(since.log, ALICE) == []
    finally:
        for tool, _ in commands:
            (HOME / f"{tag}-{tool}").unlink(missing_ok=True)
