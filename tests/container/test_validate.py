"""Validators: accepted values pass through, everything else names the field and the rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.container._validate import (
    MountSpec,
    validate_dev_repo,
    validate_instance_name,
    validate_job_id,
    validate_mount_spec,
    validate_path,
    validate_slug,
    validate_texlive_prefix,
    validate_username,
)


def test_error_message_names_field_and_rule() -> None:
    with pytest.raises(ValueError) as info:
        validate_slug("a;b")
    assert str(info.value) == "project_slug: must match ^[A-Za-z0-9][A-Za-z0-9._-]*$ (got 'a;b')"


@pytest.mark.parametrize("bad", ["", "-x", ".x", "a b", "a\nb", "a/b", "a;b", "é", "x" * 65, "$(id)"])
def test_names_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="instance_name: must"):
        validate_instance_name(bad)


def test_names_accepted() -> None:
    assert validate_instance_name("sbroker-alice.proj_1") == "sbroker-alice.proj_1"
    assert validate_username("_svc") == "_svc"
    with pytest.raises(ValueError, match="username: must be at most 32"):
        validate_username("u" * 33)
    with pytest.raises(ValueError, match="username: must be a string"):
        validate_username(None)


def test_job_id() -> None:
    assert validate_job_id(42) == "42" and validate_job_id("007") == "007"
    for bad in ["", "1a", "-1", "1 2", True]:
        with pytest.raises(ValueError, match="job_id"):
            validate_job_id(bad)


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("", "must not be empty"),
        ("rel/x", "must be an absolute path"),
        ("/a:b", "must not contain ':'"),
        ("/a,b", "must not contain ','"),
        ("/a\nb", "must not contain newline"),
        ("/a\0b", "must not contain NUL"),
        ("/a/../b", "must not contain '..' components"),
    ],
)
def test_path_rules(value: str, rule: str) -> None:
    with pytest.raises(ValueError, match=f"^host_path: {rule}"):
        validate_path(value, "host_path")


def test_path_accepts_pathlike_and_dotdot_inside_names() -> None:
    assert validate_path(Path("/srv/a..b")) == "/srv/a..b"


def test_mount_spec() -> None:
    assert validate_mount_spec("/data:/mnt/data") == MountSpec("/data", "/mnt/data", "rw")
    assert validate_mount_spec(" /a:/b:ro ").spec() == "/a:/b:ro"
    for bad in ["/a", "/a:", ":/b", "/a:/b:rx", "/a:/b:ro:x", "/a/../etc:/b", "a:/b"]:
        with pytest.raises(ValueError, match="mount"):
            validate_mount_spec(bad)


def test_dev_repo_and_texlive_prefix() -> None:
    assert validate_dev_repo({"name": "lib", "host_path": "/src/lib"}) == {"name": "lib", "host_path": "/src/lib"}
    with pytest.raises(ValueError, match=r"dev_repos\[\]\.host_path: is required"):
        validate_dev_repo({"name": "lib"})
    assert validate_texlive_prefix("/usr/") == "/usr" and validate_texlive_prefix("") == ""
    with pytest.raises(ValueError, match="texlive_prefix: must be an absolute path"):
        validate_texlive_prefix("usr")
