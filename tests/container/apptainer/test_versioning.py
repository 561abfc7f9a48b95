"""Versioning rules on temp trees of fake images (plain files with chosen mtimes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.container.apptainer import (
    cleanup,
    cleanup_sifs,
    deploy,
    get_active_version,
    list_versions,
    rollback,
    switch_version,
)

from ..conftest import make_file

T0 = 1_700_000_000


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """scitex-v2.1.0 … v2.5.0 with ascending mtimes, two bases, one stray file."""
    for i, version in enumerate(["2.1.0", "2.2.0", "2.3.0", "2.4.0", "2.5.0"]):
        make_file(tmp_path / f"scitex-v{version}.sif", T0 + i * 100)
    make_file(tmp_path / "scitex-base-v1.sif", T0 + 50)
    make_file(tmp_path / "scitex-base-v2.sif", T0 + 60)
    make_file(tmp_path / "notes.txt", T0)
    return tmp_path


def activate(directory: Path, version: str) -> None:
    (directory / "current.sif").symlink_to(f"scitex-v{version}.sif")


def test_list_versions_newest_first_with_fields(tree: Path) -> None:
    activate(tree, "2.3.0")
    rows = list_versions(tree)
    assert [r["version"] for r in rows] == ["2.5.0", "2.4.0", "2.3.0", "2.2.0", "2.1.0"]
    assert list(rows[0]) == ["version", "path", "size", "date", "active"]
    assert rows[0]["path"] == str(tree / "scitex-v2.5.0.sif")
    assert rows[0]["size"] == "1.0 B"
    assert [r["active"] for r in rows] == [False, False, True, False, False]


def test_list_versions_missing_dir_is_empty(tmp_path: Path) -> None:
    assert list_versions(tmp_path / "nope") == []


def test_equal_mtimes_break_ties_by_version_deterministically(tmp_path: Path) -> None:
    for version in ["2.9", "2.10", "2.1"]:
        make_file(tmp_path / f"scitex-v{version}.sif", T0)
    assert [r["version"] for r in list_versions(tmp_path)] == ["2.10", "2.9", "2.1"]


def test_active_version_rules(tree: Path) -> None:
    assert get_active_version(tree) is None
    activate(tree, "2.2.0")
    assert get_active_version(tree) == "2.2.0"
    (tree / "current.sif").unlink()
    (tree / "current.sif").symlink_to("scitex-v9.9.sif")  # dangling → no active version (B29)
    assert get_active_version(tree) is None
    (tree / "current.sif").unlink()
    make_file(tree / "current.sif", T0)  # a regular file is not a link
    assert get_active_version(tree) is None


def test_switch_is_relative_atomic_and_leaves_no_temp(tree: Path) -> None:
    activate(tree, "2.1.0")
    switch_version("2.4.0", tree)
    assert os.readlink(tree / "current.sif") == "scitex-v2.4.0.sif"
    assert not [p for p in tree.iterdir() if p.name.startswith(".")]


def test_switch_errors(tree: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Version 9.9 not found"):
        switch_version("9.9", tree)
    with pytest.raises(ValueError, match="version"):
        switch_version("../x", tree)
    (tree / "current.sif").mkdir()  # something that cannot be replaced by a link
    with pytest.raises(RuntimeError, match="Failed to switch to version 2.2.0"):
        switch_version("2.2.0", tree)
    assert not [p for p in tree.iterdir() if p.name.startswith(".current")]


def test_rollback_walks_back_by_mtime(tree: Path) -> None:
    activate(tree, "2.4.0")
    assert rollback(tree) == "2.3.0"
    assert rollback(tree) == "2.2.0"
    assert get_active_version(tree) == "2.2.0"


def test_rollback_errors(tree: Path) -> None:
    with pytest.raises(RuntimeError, match="No active version"):
        rollback(tree)
    activate(tree, "2.1.0")
    with pytest.raises(RuntimeError, match="No older version"):
        rollback(tree)


def test_cleanup_protects_active_and_bases(tree: Path) -> None:
    activate(tree, "2.1.0")
    removed = cleanup(tree, keep=1)
    assert [p.name for p in removed] == ["scitex-v2.4.0.sif", "scitex-v2.3.0.sif", "scitex-v2.2.0.sif"]
    left = sorted(p.name for p in tree.iterdir())
    assert left == ["current.sif", "notes.txt", "scitex-base-v1.sif", "scitex-base-v2.sif", "scitex-v2.1.0.sif", "scitex-v2.5.0.sif"]
    assert cleanup(tree, keep=0) == [tree / "scitex-v2.5.0.sif"]
    assert (tree / "scitex-v2.1.0.sif").exists()


def test_cleanup_sifs_keep_counts_active_and_keeps_bases(tree: Path) -> None:
    activate(tree, "2.1.0")
    make_file(tree / "scitex-v2.5.0.sif.old", T0)
    make_file(tree / "scitex-v2.5.0.sif.backup.1", T0)
    make_file(tree / "other.sif", T0)
    removed = {p.name for p in cleanup_sifs(tree, keep=2)}
    assert removed == {
        "scitex-v2.5.0.sif.old", "scitex-v2.5.0.sif.backup.1",
        "scitex-v2.4.0.sif", "scitex-v2.3.0.sif", "scitex-v2.2.0.sif", "other.sif",
    }  # fmt: skip
    assert get_active_version(tree) == "2.1.0"
    assert (tree / "scitex-v2.5.0.sif").exists() and (tree / "scitex-base-v1.sif").exists()


def test_cleanup_sifs_keep_zero_purges_everything(tree: Path) -> None:
    activate(tree, "2.3.0")
    cleanup_sifs(tree)
    assert sorted(p.name for p in tree.iterdir()) == ["notes.txt"]


def test_deploy_copies_active_and_newest_base_preserving_mtime(tree: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # root: no sudo needed
    activate(tree, "2.3.0")
    target = tmp_path / "deployed"
    deploy(tree, target)
    assert sorted(p.name for p in target.iterdir()) == ["current.sif", "scitex-base-v2.sif", "scitex-v2.3.0.sif"]
    assert (target / "scitex-v2.3.0.sif").stat().st_mtime == T0 + 200
    assert get_active_version(target) == "2.3.0"


def test_deploy_errors(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="No active version"):
        deploy(tree, tmp_path / "t")


def test_switch_with_sudo_uses_ln_and_mv(tree: Path, tmp_path: Path, monkeypatch) -> None:
    """With use_sudo (and not root) the link is made by sudo ln -sfn + sudo mv -Tf."""
    bin_dir = tmp_path / "sudobin"
    bin_dir.mkdir()
    log = tmp_path / "sudo.log"
    sudo = bin_dir / "sudo"
    sudo.write_text(f'#!/bin/bash\necho "$*" >> {log}\nexec "$@"\n')
    sudo.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    switch_version("2.5.0", tree, use_sudo=True)
    calls = log.read_text().splitlines()
    assert calls[0].startswith("ln -sfn scitex-v2.5.0.sif ") and ".current.sif.tmp." in calls[0]
    assert calls[1].startswith("mv -Tf ") and calls[1].endswith(str(tree / "current.sif"))
    assert get_active_version(tree) == "2.5.0"
