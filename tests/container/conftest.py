"""Fixtures for the image-toolkit tests: a fake ``apptainer`` on PATH and fake image trees."""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

FAKE_APPTAINER = Path(__file__).with_name("fake_apptainer.sh")


@dataclass
class FakeApptainer:
    """Handle on the fake runtime: its bin dir, its state dir and the calls it saw."""

    bin_dir: Path
    state: Path

    def calls(self) -> list[str]:
        path = self.state / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def knob(self, name: str, content: str = "") -> None:
        (self.state / name).write_text(content)

    def instances(self) -> list[str]:
        path = self.state / "instances"
        return [line for line in path.read_text().splitlines() if line] if path.exists() else []

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FAKE_APPTAINER_STATE": str(self.state),
        }


@pytest.fixture
def fake_apptainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeApptainer:
    bin_dir = tmp_path / "fakebin"
    state = tmp_path / "fakestate"
    bin_dir.mkdir()
    state.mkdir()
    target = bin_dir / "apptainer"
    shutil.copy(FAKE_APPTAINER, target)
    target.chmod(target.stat().st_mode | stat.S_IEXEC)
    fake = FakeApptainer(bin_dir, state)
    monkeypatch.setenv("PATH", fake.env()["PATH"])
    monkeypatch.setenv("FAKE_APPTAINER_STATE", str(state))
    return fake


@pytest.fixture
def no_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PATH with only the basic tools (no apptainer/singularity/docker/sudo)."""
    bin_dir = tmp_path / "minbin"
    bin_dir.mkdir()
    for tool in ("bash", "sh", "cat", "git", "ln", "mv", "rm"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))


def make_file(path: Path, mtime: float, content: str = "x") -> Path:
    """A fake image: a plain file with a chosen mtime."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    os.utime(path, (mtime, mtime))
    return path


def make_dir(path: Path, mtime: float) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.utime(path, (mtime, mtime))
    return path
