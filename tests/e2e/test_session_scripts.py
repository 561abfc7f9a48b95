"""session_scripts/: the ForceCommand wrapper and the sshd_config snippet are valid as shipped."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "session_scripts"


def test_wrapper_execs_sbroker_login():
    r = subprocess.run(["sh", str(SCRIPTS / "sbroker-login")], env={"SBROKER_BIN": "/bin/echo", "PATH": "/bin"},
                       capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, "login\n")


def test_wrapper_missing_sbroker_is_one_clear_line():
    r = subprocess.run(["sh", str(SCRIPTS / "sbroker-login")], env={"SBROKER_BIN": "/nonexistent/sbroker"},
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["sbroker: /nonexistent/sbroker is not installed; ask your administrator"]


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
