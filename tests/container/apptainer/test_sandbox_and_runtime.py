"""Sandbox operations and runtime/containers-dir discovery."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from broker.container.apptainer import (
    detect_container_cmd,
    find_containers_dir,
    get_active_sandbox,
    is_sandbox,
    sandbox_configure_ps1,
    sandbox_create,
    sandbox_maintain,
    sandbox_update,
)
from broker.container.apptainer._runtime import repo_containers_dir
from broker.container.apptainer._sandbox import ps1_line

from ..conftest import FakeApptainer


def test_is_sandbox() -> None:
    assert is_sandbox("/a/sandbox-1") and is_sandbox("X.SIF") and is_sandbox("foo.img")
    assert not is_sandbox("x.sif/") and not is_sandbox(Path("/c/img.sif"))


def test_detect_prefers_apptainer(fake_apptainer: FakeApptainer) -> None:
    assert detect_container_cmd() == "apptainer"


def test_find_containers_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCITEX_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # an ordinary user (root never searches cwd)
    assert find_containers_dir() == repo_containers_dir()  # the checkout's own recipes
    assert (repo_containers_dir() / "sbroker-base.def").is_file()
    (tmp_path / "containers").mkdir()
    (tmp_path / "containers" / "a.def").write_text("")
    assert find_containers_dir() == tmp_path / "containers"
    assert not (tmp_path / "state").exists()  # lookups have no side effects


def test_sandbox_create_links_relative_even_outside_parent(fake_apptainer: FakeApptainer, tmp_path: Path) -> None:
    source = tmp_path / "img.sif"
    source.write_text("sif")
    made = sandbox_create(source)
    assert made.parent == tmp_path and made.name.startswith("sandbox-")
    assert get_active_sandbox(tmp_path) == made.name.removeprefix("sandbox-")
    assert fake_apptainer.calls()[-1] == f"build --sandbox --fakeroot {made} {source}"
    elsewhere = tmp_path / "other" / "mysb"
    (tmp_path / "other").mkdir()
    sandbox_create(source, tmp_path / "parent", output_dir=elsewhere)
    link = tmp_path / "parent" / "current-sandbox"
    assert link.resolve() == elsewhere.resolve() and not os.path.isabs(os.readlink(link))
    with pytest.raises(FileNotFoundError, match="Source not found"):
        sandbox_create(tmp_path / "missing.sif")


def _prompt(env_file: Path, override: str | None = None) -> str:
    env = {"PATH": os.environ["PATH"]} | ({"SCITEX_CLOUD_APPTAINER_PS1": override} if override else {})
    out = subprocess.run(["bash", "-c", f'. "{env_file}"; printf %s "$PS1"'], capture_output=True, text=True, env=env)
    return out.stdout


@pytest.mark.parametrize("original", ["export LANG=C\n", "export PS1='x'\nexport LANG=C\n", "export LANG=C\n  export PS1=\"old\""])
def test_configure_ps1_replaces_or_appends(tmp_path: Path, original: str) -> None:
    env_file = tmp_path / ".singularity.d" / "env" / "90-environment.sh"
    env_file.parent.mkdir(parents=True)
    env_file.write_text(original)
    sandbox_configure_ps1(tmp_path)
    assert _prompt(env_file) == "\\W $ "
    assert env_file.read_text().count("export PS1=") == 1
    sandbox_configure_ps1(tmp_path, default_ps1='(lab "$x") `id` \\w> ')
    assert _prompt(env_file) == '(lab "$x") `id` \\w> '
    assert _prompt(env_file, "custom> ") == "custom> "
    assert "export LANG=C" in env_file.read_text()


def test_configure_ps1_missing_file_is_skipped(tmp_path: Path) -> None:
    sandbox_configure_ps1(tmp_path)
    with pytest.raises(ValueError):
        ps1_line("a\nb")


def test_maintain_and_update(fake_apptainer: FakeApptainer, tmp_path: Path) -> None:
    sandbox = tmp_path / "sb"
    sandbox.mkdir()
    assert sandbox_maintain(sandbox, ["apt-get", "update"]) == 0
    assert fake_apptainer.calls()[-1] == f"exec --writable --fakeroot {sandbox} apt-get update"
    fake_apptainer.knob("exec_rc", "3")
    assert sandbox_maintain(sandbox, ["false"]) == 3
    proj = tmp_path / "proj"
    (proj / "scitex-code").mkdir(parents=True)
    (proj / "figrecipe").mkdir()
    result = sandbox_update(sandbox, proj_root=proj, packages=("scitex", "figrecipe", "socialia"))
    assert result == {"scitex": "failed", "figrecipe": "failed", "socialia": "skipped"}
    fake_apptainer.knob("exec_rc", "0")
    assert sandbox_update(sandbox, proj_root=proj, packages=["figrecipe"], install_deps=True) == {"figrecipe": "ok"}
    assert fake_apptainer.calls()[-1] == (
        f"exec --writable --fakeroot --bind {proj}:{proj} {sandbox} pip install {proj / 'figrecipe'}"
    )
    assert (sandbox.resolve() / str(proj).lstrip("/")).is_dir()
    with pytest.raises(FileNotFoundError):
        sandbox_maintain(tmp_path / "nope", ["true"])
