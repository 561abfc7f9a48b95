"""env_snapshot: shape, hyphenated and legacy lock names, never raising."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from broker.container import env_snapshot


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shape_and_container_section(tmp_path: Path) -> None:
    image_dir = tmp_path / "img"
    image_dir.mkdir()
    sif = image_dir / "scitex-v1.0.sif"
    sif.write_text("sif")
    (image_dir / ".def-hash").write_text("abc\n")
    (image_dir / "requirements-lock.txt").write_text("a==1\n")
    (tmp_path / "dpkg_lock.txt").write_text("b=2\n")
    (tmp_path / "current.sif").symlink_to("img/scitex-v1.0.sif")
    snap = env_snapshot(tmp_path)
    assert list(snap) == ["schema_version", "timestamp", "container", "host", "dev_repos", "lock_files"]
    assert snap["schema_version"] == "1.0"
    assert datetime.fromisoformat(snap["timestamp"]).utcoffset().total_seconds() == 0
    assert snap["container"] == {"version": "1.0", "sif_path": str(sif), "sif_sha256": _sha(sif), "def_hash": "abc"}
    assert snap["lock_files"] == {"pip": _sha(image_dir / "requirements-lock.txt"), "dpkg": _sha(tmp_path / "dpkg_lock.txt")}
    assert set(snap["host"]) == {"texlive", "imagemagick"}
    json.dumps(snap)


def test_dev_repos(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    entries = env_snapshot(tmp_path, [plain, tmp_path / "missing"])["dev_repos"]
    assert entries[1] == {"name": "missing", "path": str((tmp_path / "missing").resolve()), "error": "path does not exist"}
    assert entries[0]["name"] == "plain" and "commit" not in entries[0]
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
        check=True,
    )
    (repo / "dirty").write_text("")
    [entry] = env_snapshot(tmp_path, [repo])["dev_repos"]
    assert entry["branch"] == "main" and len(entry["commit"]) == 40 and entry["dirty"] is True


def test_never_raises_without_containers_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    snap = env_snapshot(tmp_path / "does-not-exist")
    assert snap["container"] == {"version": None} and snap["lock_files"] == {}
