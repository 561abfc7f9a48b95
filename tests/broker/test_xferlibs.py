"""The daemon lists each login-side transfer server's libraries once (broker/xferlibs.py), only
for binaries no one but root can have changed, and the login client uses that list instead of
running the loader itself."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from broker import loginxfer
from broker.xferlibs import Libraries, root_only

from .test_xferroute import REPO, needs_landlock

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="root-owned directories are made as root")


@pytest.fixture
def root_dir():
    """A directory that only root can write, and every directory above it too (/run)."""
    path = Path("/run") / f"sbroker-test-xferlibs-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


async def _settle(libs: Libraries) -> None:
    while libs.tasks:
        await asyncio.wait(set(libs.tasks), timeout=10)


def test_system_binaries_are_roots_alone_and_tmp_is_not(tmp_path):
    assert root_only("/bin/cat")  # /bin is a symlink to usr/bin on Debian 12: both chains checked
    copy = tmp_path / "cat"
    shutil.copy("/bin/cat", copy)
    assert not root_only(str(copy))  # /tmp is writable by everyone
    assert not root_only("/nonexistent/cat")


@as_root
def test_a_group_writable_binary_or_directory_is_not_roots_alone(root_dir):
    binary = root_dir / "cat"
    shutil.copy("/bin/cat", binary)
    assert root_only(str(binary))
    binary.chmod(0o775)
    assert not root_only(str(binary))
    binary.chmod(0o755)
    root_dir.chmod(0o775)
    assert not root_only(str(binary))
    root_dir.chmod(0o755)
    os.chown(binary, 1, -1)
    assert not root_only(str(binary))


@as_root
async def test_listed_once_and_again_only_when_the_binary_changes(root_dir):
    binary = root_dir / "cat"
    shutil.copy("/bin/cat", binary)
    libs = Libraries()
    assert libs.get(str(binary)) is None  # the first transfer lists for itself; the daemon starts a listing
    assert libs.get(str(binary)) is None and len(libs.tasks) == 1  # one listing at a time
    await _settle(libs)
    listed = libs.get(str(binary))
    assert listed == loginxfer.libraries(str(binary))
    assert any(os.path.basename(lib).startswith("libc.so") for lib in listed)
    assert libs.get(str(binary)) is listed and not libs.tasks
    binary.write_bytes(Path("/bin/cat").read_bytes())  # a new version (new mtime): stale until listed again
    assert libs.get(str(binary)) is None
    await _settle(libs)
    assert libs.get(str(binary)) == listed


async def test_a_binary_others_could_change_is_never_run_by_the_daemon(tmp_path):
    binary = tmp_path / "cat"
    marker = tmp_path / "ran"
    binary.write_text(f"#!/bin/sh\ntouch {marker}\n")
    binary.chmod(0o755)
    libs = Libraries()
    assert libs.get(str(binary)) is None
    await _settle(libs)
    assert libs.get(str(binary)) is None and not libs.tasks  # refused once, not retried per transfer
    assert not marker.exists()


@needs_landlock
def test_the_login_client_takes_the_brokers_list_and_runs_no_loader(tmp_path):
    (tmp_path / "data").write_bytes(b"payload")
    listed = loginxfer.libraries("/bin/cat")
    code = f"""
import sys
from broker import loginxfer
def no_loader(*args):
    raise AssertionError("the login client ran the loader")
loginxfer._output = no_loader
sys.exit(loginxfer.run({{"argv": ["/bin/cat", "--", "data"], "cwd": {str(tmp_path)!r},
                        "trees": [[{str(tmp_path)!r}, "ro"]], "libraries": {listed!r}}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (out.returncode, out.stdout, out.stderr) == (0, "payload", "")
