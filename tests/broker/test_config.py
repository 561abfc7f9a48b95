"""Config validation: every bad field is one line naming the field and the rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import ConfigError, load, parse

GOOD = {"container": {"image": "/opt/images/current.sif"}}


def test_minimal_config_gets_safe_defaults():
    cfg = parse(GOOD)
    assert cfg.socket == "/run/sbroker/broker.sock"
    assert cfg.state_dir == Path("/var/lib/sbroker")
    assert cfg.image == Path("/opt/images/current.sif")
    assert cfg.walltime_warnings == (1800, 300)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse({
            "slurm": {"cpus": 0, "time_limit": "soon", "partition": "a b", "path": "bin:/usr/bin"},
            "container": {"image": "relative.sif", "project_dir": "/p/{uid}", "projects": ["ok", "no way"],
                          "host_mounts": [{"host_path": "/a", "container_path": "/b", "mode": "rwx"}]},
            "broker": {"socket": "/run/x;y.sock", "log_level": "loud"},
            "nonsense": {},
        })
    problems = err.value.problems
    fields = sorted(p.split(":", 1)[0] for p in problems)
    assert fields == sorted([
        "slurm.cpus", "slurm.time_limit", "slurm.partition", "slurm.path", "container.image",
        "container.project_dir", "container.projects", "container.host_mounts", "broker.socket",
        "broker.log_level", "nonsense"])
    assert any("between 1 and 4096" in p for p in problems)


def test_unknown_key_and_missing_image():
    with pytest.raises(ConfigError, match="slurm.cpu: unknown key"):
        parse({**GOOD, "slurm": {"cpu": 4}})
    with pytest.raises(ConfigError, match="container.image: is required"):
        parse({})


def test_typed_tables():
    cfg = parse({"container": {"image": "/i.sif", "dev_repos": [{"name": "lib", "host_path": "/src/lib"}],
                               "host_mounts": [{"host_path": "/data", "container_path": "/mnt/data"}]}})
    assert cfg.dev_repos[0].name == "lib"
    assert cfg.host_mounts[0].mode == "ro"


def test_load_reports_file_problems(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[slurm\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)
    good = tmp_path / "good.toml"
    good.write_text('[container]\nimage = "/i.sif"\n[slurm]\ncpus = 2\n')
    monkeypatch.setenv("SBROKER_CONFIG", str(good))
    assert load().cpus == 2


@pytest.mark.parametrize("key, value", [("broker.admin_group", "admins\n"), ("broker.socket", "/run/x.sock\n"),
                                        ("slurm.time_limit", "8:00:00\n"), ("slurm.partition", "compute\n")])
def test_trailing_newline_is_not_a_match(key, value):
    """``$`` in a regex also matches before a final newline: every check is a full match."""
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=key):
        parse({**GOOD, section: {name: value}})


def test_check_config_explains_the_shared_job_dir_and_refuses_a_node_local_one(tmp_path):
    import subprocess
    import sys
    conf = tmp_path / "broker.toml"
    conf.write_text('[container]\nimage = "/i.sif"\n')
    ok = subprocess.run([sys.executable, "-m", "broker", "check-config", "--config", str(conf), "--config-only"],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "shared storage: slurm.job_dir = {home}/.sbroker/jobs:" in ok.stdout
    conf.write_text('[container]\nimage = "/i.sif"\n[slurm]\njob_dir = "/tmp/sbroker/{user}"\n')
    bad = subprocess.run([sys.executable, "-m", "broker", "check-config", "--config", str(conf), "--config-only"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1
    assert bad.stderr == ("sbroker: config: slurm.job_dir: /tmp/sbroker/{user} is under /tmp, which is private"
                          " to each node: no session can become ready\n")
