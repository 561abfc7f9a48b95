"""Fixtures for the apptainer stand-in tests.

The stand-in is installed into a world-readable directory and run as an ordinary user
(``sbstandin``, created when missing) via ``runuser`` when the tests run as root; as the
current user otherwise. When a real ``apptainer`` is on PATH the behavioural tests run
against it and the stand-in-specific ones are skipped.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import standin

TEST_USER = "sbstandin"
IMAGES = Path("/tmp/sbstandin-images")
BIN = Path("/tmp/sbstandin-bin")


class Runner:
    def __init__(self, apptainer: str, user: str | None):
        self.apptainer = apptainer
        self.user = user
        self.pw = pwd.getpwnam(user) if user else pwd.getpwuid(os.getuid())
        self.is_standin = standin.real_apptainer() is None

    def prefix(self) -> list[str]:
        return ["runuser", "-u", self.user, "--"] if self.user else []

    def argv(self, *args: str) -> list[str]:
        return [*self.prefix(), self.apptainer, *args]

    def __call__(self, *args: str, input: bytes | None = None, timeout: float = 30,
                 env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
        e = dict(os.environ)
        if env:
            e.update(env)
        return subprocess.run(self.argv(*args), input=input, capture_output=True, timeout=timeout,
                              env=e, cwd=cwd or "/tmp", stdin=None if input is not None else subprocess.DEVNULL)

    def sh(self, user_cmd: str, **kw) -> subprocess.CompletedProcess:
        """Run a host shell command as the test user."""
        return subprocess.run([*self.prefix(), "sh", "-c", user_cmd], capture_output=True, **kw)

    def instance_dir(self, name: str) -> Path:
        return (Path(self.pw.pw_dir) / ".apptainer" / "instances" / "app" / os.uname().nodename
                / self.pw.pw_name / name)


def _ensure_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", TEST_USER], check=True)
    home = Path(pwd.getpwnam(TEST_USER).pw_dir)
    if not home.exists():
        subprocess.run(["mkhomedir_helper", TEST_USER], check=False)
        home.mkdir(parents=True, exist_ok=True)
        shutil.chown(home, TEST_USER, TEST_USER)
    return TEST_USER


@pytest.fixture(scope="session")
def image() -> str:
    if not shutil.which("bwrap") and standin.real_apptainer() is None:
        pytest.skip("bubblewrap is not installed")
    return str(standin.build_test_image(IMAGES))


@pytest.fixture(scope="session")
def app(image) -> Runner:
    real = standin.real_apptainer()
    exe = real or str(standin.install(BIN))
    for d in (BIN, IMAGES, Path("/tmp")):
        d.chmod(d.stat().st_mode | 0o755) if d.exists() and os.geteuid() == 0 and d != Path("/tmp") else None
    r = Runner(exe, _ensure_user())
    yield r
    r("instance", "stop", "--all", "--force", timeout=30)


@pytest.fixture()
def standin_only(app):
    if not app.is_standin:
        pytest.skip("stand-in specific (a real apptainer is on PATH)")
