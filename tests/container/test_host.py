"""Host package checks, TeX Live binds (B13), mount config, install script (B14, B26)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.container import host


def _tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, names: list[str]) -> Path:
    bin_dir = tmp_path / "hostbin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\necho '{name} version 1.0'\n")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def test_ghostscript_alone_is_not_texlive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tools(tmp_path, monkeypatch, ["gs", "pdfinfo", "identify"])
    report = host.check_packages()
    assert report["texlive"] == {"installed": False, "version": "", "binaries": ["gs", "pdfinfo"]}
    assert report["imagemagick"] == {"installed": True, "version": "", "binaries": ["identify"]}


def test_texlive_detected_with_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tools(tmp_path, monkeypatch, ["pdflatex", "biber", "convert"])
    report = host.check_packages()
    assert report["texlive"] == {"installed": True, "version": "pdflatex version 1.0", "binaries": ["pdflatex", "biber"]}
    assert report["imagemagick"]["version"] == "convert version 1.0"


def test_texlive_binds_reroot_under_usr(tmp_path: Path) -> None:
    prefix = tmp_path / "tl"
    (prefix / "share" / "texlive").mkdir(parents=True)
    (prefix / "bin").mkdir()
    for name in ("pdflatex", "biber"):
        (prefix / "bin" / name).write_text("")
    binds = host.get_texlive_binds(str(prefix) + "/")
    assert binds == [
        {"host": f"{prefix}/share/texlive", "container": "/usr/share/texlive", "mode": "ro"},
        {"host": f"{prefix}/bin/pdflatex", "container": "/usr/bin/pdflatex", "mode": "ro"},
        {"host": f"{prefix}/bin/biber", "container": "/usr/bin/biber", "mode": "ro"},
    ]
    assert host.get_texlive_binds(str(tmp_path / "none")) == []
    with pytest.raises(ValueError, match="prefix"):
        host.get_texlive_binds("/a,b")


def test_mount_config(tmp_path: Path) -> None:
    prefix = tmp_path / "tl"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "pdflatex").write_text("")
    config = host.get_mount_config(str(prefix), "/a:/b, /c:/d:ro\n\n,")
    assert config["path_additions"] == ["/usr/bin"]
    assert config["mounts"] == [
        {"host": f"{prefix}/bin/pdflatex", "container": "/usr/bin/pdflatex", "mode": "ro"},
        {"host": "/a", "container": "/b", "mode": "rw"},
        {"host": "/c", "container": "/d", "mode": "ro"},
    ]
    assert config["bind_args"] == [
        "--bind", f"{prefix}/bin/pdflatex:/usr/bin/pdflatex:ro", "--bind", "/a:/b:rw", "--bind", "/c:/d:ro",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"host_mounts_raw\[0\]"):
        host.get_mount_config(str(tmp_path / "none"), "/e:/f:g:h")


def test_install_script_ships_in_the_package() -> None:
    script = host.install_script_path()
    assert script.is_file() and script.parent.parent == Path(host.__file__).parent
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script), "--check"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("texlive: ")


def test_install_check_only_never_uses_sudo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    bin_dir = _tools(tmp_path, monkeypatch, [])  # no sudo on PATH: a sudo call would fail
    (bin_dir / "bash").symlink_to(bash)
    result = host.install_packages(check_only=True)
    assert result == {"script": str(host.install_script_path()), "check": {"returncode": 0}}


def test_install_runs_script_with_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "calls"
    bin_dir = _tools(tmp_path, monkeypatch, ["apt-get"])
    for name in ("sudo", "bash"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\nexit 0\n')
        (bin_dir / name).chmod(0o755)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    script = str(host.install_script_path())
    assert host.install_packages(texlive=True) == {
        "script": script,
        "texlive": {"status": "installed", "returncode": 0},
        "imagemagick": {"status": "skipped", "returncode": None},
    }
    assert host.install_packages()["imagemagick"]["status"] == "installed"  # no flags = all
    assert log.read_text().splitlines() == [f"sudo bash {script} --texlive", f"sudo bash {script} --all"]


def test_install_without_apt_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tools(tmp_path, monkeypatch, [])
    with pytest.raises(RuntimeError, match="apt-get not found"):
        host.install_packages(all=True)
