"""Item 10: the runner never enters a user's home as root; the user enters it after the drop.

A root-squashed NFS home (or a user's FUSE mount without ``allow_other``) refuses root
but lets the user in. Simulated without NFS: the runner runs in a child process that is
still uid 0 but has lost ``CAP_DAC_OVERRIDE``/``CAP_DAC_READ_SEARCH`` (``setpriv``), and
the home is a ``0700`` directory of ``nobody``. Root cannot enter it; ``nobody`` can.
Both ``Runner.run`` and ``Runner.spawn_pty`` must start the command, in the home.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534

CHILD = r"""
import asyncio, os, sys
sys.path.insert(0, sys.argv[1])
from broker import log
from broker.identity import User
from broker.slurm.runner import Runner

log.configure("warning", sys.stderr)

home = sys.argv[2]
user = User(name="nobody", uid=65534, gid=65534, groups=(), home=home, shell="/bin/sh")

async def main():
    runner = Runner(path="/usr/bin:/bin")
    result = await runner.run(["pwd"], user=user, check=False)
    print("run", result.returncode, result.stdout.strip(), result.stderr.strip().replace("\n", " "))
    leader, follower = os.openpty()
    proc = await runner.spawn_pty(["sh", "-c", "pwd; id -u"], user=user, tty_fd=follower)
    os.close(follower)
    await proc.wait()
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    print("pty", " ".join(out.decode().split()))

try:
    asyncio.run(main())
except OSError as exc:
    print("spawn failed:", exc)
"""


@pytest.fixture
def squashed_home() -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and util-linux setpriv")
    base = Path(tempfile.mkdtemp(prefix="sbhostile-home-", dir="/tmp"))
    base.chmod(0o711)
    home = base / "nobody"
    home.mkdir(mode=0o700)
    os.chown(home, NOBODY, NOBODY)
    yield home
    shutil.rmtree(base)


def test_home_is_entered_as_the_user_not_as_root(squashed_home: Path) -> None:
    drop = "-dac_override,-dac_read_search"
    out = subprocess.run(
        ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-c", CHILD,
         str(REPO), str(squashed_home)],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines == [f"run 0 {squashed_home} ", f"pty {squashed_home} {NOBODY}"], out.stdout + out.stderr


def test_unreachable_home_falls_back_to_root_dir(squashed_home: Path) -> None:
    squashed_home.chmod(0o000)  # not even its owner may enter: the command still runs, in /
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(squashed_home)],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.stdout.splitlines() == ["run 0 / ", f"pty / {NOBODY}"], out.stdout + out.stderr
