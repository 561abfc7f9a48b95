"""session_scripts/: the ForceCommand wrapper and the sshd_config snippet are valid as shipped."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "session_scripts"


def test_wrapper_execs_sbroker_login_isolated(tmp_path):
    """The wrapper runs the venv's python isolated, with the fixed socket (tests/hostile has the hostile cases)."""
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\necho \"$@\"\n")
    fake.chmod(0o755)
    copy = tmp_path / "sbroker-login"
    copy.write_text((SCRIPTS / "sbroker-login").read_text().replace("/opt/sbroker/venv/bin/python3", str(fake)))
    r = subprocess.run(["sh", str(copy), "-c", "ignored"], env={"PATH": "/bin"}, capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stdout.startswith("-I -c ") and r.stdout.endswith(" login --socket /run/sbroker/broker.sock\n")


def test_wrapper_missing_sbroker_is_one_clear_line(tmp_path):
    copy = tmp_path / "sbroker-login"
    copy.write_text((SCRIPTS / "sbroker-login").read_text().replace("/opt/sbroker/venv/bin/python3",
                                                                    "/nonexistent/python3"))
    r = subprocess.run(["sh", str(copy)], env={"SBROKER_BIN": "/bin/echo"}, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["sbroker: /nonexistent/python3 is not installed; ask your administrator"]


@pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="no sshd")
def test_snippet_passes_sshd_t(tmp_path):
    key = tmp_path / "hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = tmp_path / "sshd_config"
    config.write_text(f"HostKey {key}\nUsePAM no\n" + (SCRIPTS / "sshd_config.snippet").read_text())
    r = subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(config)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = (SCRIPTS / "sshd_config.snippet").read_text()
    for line in ("ForceCommand /usr/local/sbin/sbroker-login", "AcceptEnv SBROKER_PROJECT",
                 "Subsystem sftp /usr/lib/openssh/sftp-server"):
        assert line in text
