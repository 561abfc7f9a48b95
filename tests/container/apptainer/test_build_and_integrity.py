"""build / freeze / verify / status against the fake apptainer (no real runtime needed)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.container._files import sha256_file
from broker.container._proc import MissingToolError
from broker.container.apptainer import build, freeze, status, verify

from ..conftest import FakeApptainer

PIP = "numpy==1.26.0\nrequests==2.31.0\n"
DPKG = "bash=5.2\ncoreutils=9.1\n"


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipes" / "img.def"
    path.parent.mkdir()
    path.write_text("Bootstrap: docker\nFrom: debian:bookworm-slim\n")
    return path


@pytest.fixture
def captures(fake_apptainer: FakeApptainer) -> FakeApptainer:
    fake_apptainer.knob("pip_out", PIP)
    fake_apptainer.knob("dpkg_out", DPKG)
    return fake_apptainer


def builds(fake: FakeApptainer) -> list[str]:
    return [c for c in fake.calls() if c.startswith("build ")]


def test_build_layout_hash_locks_and_link(captures: FakeApptainer, recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    sif = build(def_path=recipe, output_dir=out)
    assert sif == out / "img" / "img.sif" and sif.is_file()
    [call] = builds(captures)
    tokens = call.split()
    assert tokens[:2] == ["build", "--force"] and tokens[-1] == str(recipe)
    assert Path(tokens[2]).parent == out / "img" and tokens[2] != str(sif)  # built under a temp name
    assert (out / "img" / ".def-hash").read_text() == hashlib.sha256(recipe.read_bytes()).hexdigest() + "\n"
    assert (out / "img" / "img.def").read_text() == recipe.read_text()
    assert os.readlink(out / "img.sif") == "img/img.sif"
    assert (out / "img" / "requirements-lock.txt").read_text() == PIP
    assert (out / "img" / "dpkg-lock.txt").read_text() == DPKG
    assert not (out / "img" / "node-lock.txt").exists()
    assert len(list((out / "img").glob("img.build-*.log"))) == 1
    freeze_calls = [c for c in captures.calls() if c.startswith("exec ")]
    assert all(c.startswith("exec --cleanenv --no-home ") for c in freeze_calls)


def test_build_skips_unchanged_and_rebuilds_on_force_or_change(captures: FakeApptainer, recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build(def_path=recipe, output_dir=out)
    build(def_path=recipe, output_dir=out)
    assert len(builds(captures)) == 1
    build(def_path=recipe, output_dir=out, force=True)
    recipe.write_text(recipe.read_text() + "%post\n  true\n")
    build(def_path=recipe, output_dir=out)
    assert len(builds(captures)) == 3


def test_failed_build_keeps_the_live_image_and_hash(captures: FakeApptainer, recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    sif = build(def_path=recipe, output_dir=out)
    before, hash_before = sif.read_text(), (out / "img" / ".def-hash").read_text()
    recipe.write_text("changed\n")
    captures.knob("build_fail")
    with pytest.raises(RuntimeError, match="Build failed with exit code 1; see .*img.build-"):
        build(def_path=recipe, output_dir=out)
    assert sif.read_text() == before
    assert (out / "img" / ".def-hash").read_text() == hash_before
    assert (out / "img" / "img.def").read_text() != "changed\n"
    assert not [p for p in (out / "img").iterdir() if p.name.startswith(".img.build-")]


def test_build_sandbox_uses_fakeroot_and_sandbox_hash(captures: FakeApptainer, recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = build(def_path=recipe, output_dir=out, sandbox=True, image_name="sb")
    assert path == out / "sb" / "sb.sandbox" and path.is_dir()
    assert builds(captures)[0].split()[:4] == ["build", "--sandbox", "--fakeroot", "--force"]
    assert (out / "sb" / ".sandbox-hash").is_file() and not (out / "sb.sif").exists()
    build(def_path=recipe, output_dir=out, sandbox=True, image_name="sb", force=True)  # replaces the dir
    assert path.is_dir() and len(builds(captures)) == 2


def test_build_refuses_to_delete_a_real_file_at_the_link_path(captures: FakeApptainer, recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "img.sif").write_text("precious")
    build(def_path=recipe, output_dir=out)
    assert (out / "img.sif").read_text() == "precious"


def test_build_errors(no_runtime: None, recipe: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither apptainer nor singularity"):
        build(def_path=recipe)


def test_build_missing_recipe(fake_apptainer: FakeApptainer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Definition file not found"):
        build(def_path=tmp_path / "nope.def")
    with pytest.raises(ValueError, match="image_name"):
        build(def_path=Path(__file__), image_name="a/b")


def test_freeze_deletes_stale_lock_when_capture_fails(captures: FakeApptainer, tmp_path: Path) -> None:
    sif = tmp_path / "x.sif"
    sif.write_text("sif")
    (tmp_path / "dpkg-lock.txt").write_text("stale\n")
    captures.knob("dpkg_rc", "1")
    captures.knob("npm_out", "{}")
    locks = freeze(sif)
    assert set(locks) == {"pip", "node"}
    assert not (tmp_path / "dpkg-lock.txt").exists()
    with pytest.raises(FileNotFoundError):
        freeze(tmp_path / "missing.sif")


def test_verify_pass_through_the_top_level_symlink(captures: FakeApptainer, recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build(def_path=recipe, output_dir=out)
    report = verify(out / "img.sif", def_path=recipe)
    assert report["sif"] == {"path": str(out / "img.sif"), "sha256": sha256_file(out / "img" / "img.sif"), "exists": True}
    assert report["def_origin"]["status"] == "pass"
    assert report["pip_lock"] == {"status": "pass", "detail": "All 2 packages match", "diff_count": 0}
    assert report["dpkg_lock"]["status"] == "pass"
    assert report["overall"] == "pass"


def test_verify_detects_drift_and_reports_diff(captures: FakeApptainer, recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build(def_path=recipe, output_dir=out)
    captures.knob("pip_out", "numpy==2.0.0\nrequests==2.31.0\nrich==13\n")
    recipe.write_text("edited\n")
    report = verify(out / "img" / "img.sif", def_path=recipe)
    assert report["def_origin"]["status"] == "fail" and "mismatch" in report["def_origin"]["detail"]
    pip = report["pip_lock"]
    assert (pip["status"], pip["diff_count"], pip["detail"]) == ("fail", 3, "Package mismatch: +2 new, -1 missing")
    assert pip["added"] == ["numpy==2.0.0", "rich==13"] and pip["removed"] == ["numpy==1.26.0"]
    assert report["overall"] == "fail"


def test_verify_skip_entries_have_diff_count_and_missing_sif_fails(tmp_path: Path) -> None:
    report = verify(tmp_path / "nope.sif")
    assert report["overall"] == "fail" and report["sif"]["exists"] is False
    sif = tmp_path / "a.sif"
    sif.write_text("x")
    report = verify(sif)
    assert report["pip_lock"] == {"status": "skip", "detail": "No lock file found", "diff_count": 0}
    assert report["def_origin"]["diff_count"] == 0 and report["overall"] == "pass"


def test_verify_locks_without_runtime_is_a_failure(no_runtime: None, tmp_path: Path) -> None:
    sif = tmp_path / "a.sif"
    sif.write_text("x")
    (tmp_path / "requirements-lock.txt").write_text(PIP)
    report = verify(sif)
    assert report["pip_lock"]["status"] == "fail" and report["pip_lock"]["diff_count"] == -1
    assert "no container command" in report["pip_lock"]["detail"]
    assert report["overall"] == "fail"


def test_verify_tool_failure(captures: FakeApptainer, tmp_path: Path) -> None:
    sif = tmp_path / "a.sif"
    sif.write_text("x")
    (tmp_path / "dpkg-lock.txt").write_text(DPKG)
    captures.knob("dpkg_rc", "2")
    entry = verify(sif)["dpkg_lock"]
    assert entry["status"] == "fail" and entry["diff_count"] == -1 and entry["detail"].startswith("dpkg-query failed")


def test_streaming_sha256_matches_sha256sum(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * (1 << 20) + 12345))
    expected = hashlib.sha256(big.read_bytes()).hexdigest()
    assert sha256_file(big) == expected
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", str(big)], capture_output=True, text=True).stdout.split()[0] == expected


def test_status_reads_per_image_hash(captures: FakeApptainer, recipe: Path) -> None:
    directory = recipe.parent
    (directory / "other.def").write_text("x\n")
    before = {row["name"]: row for row in status(directory)}
    assert before["img"]["sif_path"] is None and before["img"]["needs_rebuild"] is True
    build(def_path=recipe)
    rows = status(directory)
    assert [r["name"] for r in rows] == ["img", "other"]
    row = rows[0]
    assert list(row) == ["name", "def_path", "sif_path", "sif_size", "sif_date", "hash_current", "hash_stored", "needs_rebuild"]
    assert row["sif_path"] == str(directory / "img.sif")
    assert row["hash_stored"] == row["hash_current"] and row["needs_rebuild"] is False


def test_missing_runtime_error_is_both_kinds(no_runtime: None) -> None:
    from broker.container.apptainer import detect_container_cmd

    with pytest.raises(MissingToolError) as info:
        detect_container_cmd()
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, RuntimeError)
