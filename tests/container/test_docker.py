"""Compose discovery (B28), command execution against a fake docker, dev mounts (B12)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from broker.container import docker
from broker.container._proc import MissingToolError


@pytest.fixture
def fake_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "dockerbin"
    bin_dir.mkdir()
    log = tmp_path / "docker.log"
    script = bin_dir / "docker"
    script.write_text(
        "#!/bin/bash\n"
        f'echo "$PWD|$*" >> {log}\n'
        'case " $* " in *" down "*) exit "${DOWN_RC:-0}" ;; *" ps "*) printf "%s" "$PS_OUT" ;; esac\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def test_candidates_order() -> None:
    assert docker.compose_candidates("dev") == [
        "docker-compose.dev.yml", "docker-compose.dev.yaml", "compose.dev.yml", "compose.dev.yaml",
        "docker-compose.yml", "docker-compose.yaml", "compose.yml", "compose.yaml",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="env"):
        docker.compose_candidates("../x")


def test_explicit_project_dir_is_searched_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "compose.yml").write_text("")
    project = tmp_path / "proj"
    project.mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no compose file"):
        docker.find_compose_file("dev", project)
    (project / "docker-compose.yaml").write_text("")
    assert docker.find_compose_file("dev", project) == project / "docker-compose.yaml"
    (project / "compose.dev.yaml").write_text("")
    assert docker.find_compose_file("dev", project) == project / "compose.dev.yaml"


def test_cwd_chain_walks_upward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "docker-compose.dev.yml").write_text("")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert docker.find_compose_file() == tmp_path.resolve() / "docker-compose.dev.yml"


def test_rebuild_restart_status(fake_docker: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compose = tmp_path / "docker-compose.yml"
    compose.write_text("")
    assert docker.rebuild(project_dir=tmp_path) == 0
    assert docker.restart(project_dir=tmp_path) == 0
    calls = fake_docker.read_text().splitlines()
    assert calls == [
        f"{tmp_path}|compose -f {compose} build --no-cache",
        f"{tmp_path}|compose -f {compose} down",
        f"{tmp_path}|compose -f {compose} up -d",
    ]
    monkeypatch.setenv("DOWN_RC", "4")
    assert docker.restart(project_dir=tmp_path) == 4
    item = {"Name": "app_web_1", "State": "running", "Image": "app:latest"}
    monkeypatch.setenv("PS_OUT", json.dumps(item) + "\nnot json\n" + json.dumps({"name": "db"}))
    result = docker.status(project_dir=tmp_path)
    assert result["compose_file"] == str(compose) and result["returncode"] == 0
    assert result["containers"] == [
        {"name": "app_web_1", "state": "running", "image": "app:latest", "raw": item},
        {"name": "db", "state": "", "image": "", "raw": {"name": "db"}},
    ]
    monkeypatch.setenv("PS_OUT", json.dumps([item]))
    assert [c["name"] for c in docker.status(project_dir=tmp_path)["containers"]] == ["app_web_1"]


def test_missing_docker_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "compose.yml").write_text("")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(MissingToolError, match="docker not found on PATH"):
        docker.rebuild(project_dir=tmp_path)


def test_dev_mounts_reference_examples() -> None:
    assert docker.get_dev_mounts(
        [
            {"host": "../../scitex-python", "container": "/scitex-python"},
            {"host": "/abs/path/to/myrepo", "container": "/myrepo", "mode": "rw"},
            {"host": "./foo", "container": "/foo"},
            {"host": "foo", "container": "/foo2"},
            {"host": "", "container": "/skipped"},
            {"container": "/skipped"},
        ]
    ) == [
        "./../../scitex-python:/scitex-python:ro",
        "/abs/path/to/myrepo:/myrepo:rw",
        "./foo:/foo:ro",
        "./foo:/foo2:ro",
    ]


@pytest.mark.parametrize(
    "repo",
    [
        {"host": "/a:b", "container": "/x"},
        {"host": "/a", "container": "/x,y"},
        {"host": "/a", "container": "rel"},
        {"host": "/a", "container": "/x", "mode": "rwx"},
        {"host": "/a\nb", "container": "/x"},
    ],
)
def test_dev_mounts_reject(repo: dict) -> None:
    with pytest.raises(ValueError, match=r"repos\[0\]"):
        docker.get_dev_mounts([repo])
