"""Sandbox versioning on temp trees of fake sandbox directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.container.apptainer import (
    cleanup_sandboxes,
    get_active_sandbox,
    list_sandboxes,
    rollback_sandbox,
    switch_sandbox,
)

from ..conftest import make_dir

T0 = 1_700_000_000
STAMPS = ["20260101_000000", "20260102_000000", "20260103_000000", "20260104_000000"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for i, stamp in enumerate(STAMPS):
        make_dir(tmp_path / f"sandbox-{stamp}", T0 + i)
    make_dir(tmp_path / "sandbox-bogus", T0 + 99)
    return tmp_path


def test_list_and_active(tree: Path) -> None:
    assert get_active_sandbox(tree) is None
    (tree / "current-sandbox").symlink_to("sandbox-20260102_000000")
    rows = list_sandboxes(tree)
    assert [r["version"] for r in rows] == STAMPS[::-1]
    assert list(rows[0]) == ["version", "path", "date", "active"]
    assert [r["active"] for r in rows] == [False, False, True, False]


def test_missing_dir_lists_and_cleans_nothing(tmp_path: Path) -> None:
    assert list_sandboxes(tmp_path / "nope") == []
    assert cleanup_sandboxes(tmp_path / "nope") == []
    with pytest.raises(RuntimeError, match="No active sandbox"):
        rollback_sandbox(tmp_path / "nope")


def test_switch_and_rollback(tree: Path) -> None:
    switch_sandbox(STAMPS[3], tree)
    assert os.readlink(tree / "current-sandbox") == f"sandbox-{STAMPS[3]}"
    assert rollback_sandbox(tree) == STAMPS[2]
    assert get_active_sandbox(tree) == STAMPS[2]
    with pytest.raises(FileNotFoundError):
        switch_sandbox("20990101_000000", tree)
    with pytest.raises(ValueError):
        switch_sandbox("../x", tree)


def test_cleanup_keeps_active(tree: Path) -> None:
    switch_sandbox(STAMPS[0], tree)
    removed = cleanup_sandboxes(tree, keep=1)
    assert [p.name for p in removed] == [f"sandbox-{STAMPS[2]}", f"sandbox-{STAMPS[1]}"]
    assert (tree / f"sandbox-{STAMPS[0]}").is_dir() and (tree / f"sandbox-{STAMPS[3]}").is_dir()
