"""The SSH endpoint's pure parts (issue 18): sshd's argv, the login-side host key and config,
the reserved ``sbroker`` words of ``sbroker login`` and the config key."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from broker import login, sshendpoint
from broker.config import ConfigError, parse
from broker.shells import SSHD, instance_sshd_argv


def options(argv: list[str]) -> dict[str, str]:
    pairs = [argv[i + 1] for i, word in enumerate(argv) if word == "-o"]
    out = {}
    for pair in pairs:
        name, _, value = pair.partition(" " if pair.startswith("Subsystem") else "=")
        out[name] = value
    return out


def test_sshd_runs_in_the_instance_as_an_inetd_server_with_every_setting_on_its_command_line():
    argv = instance_sshd_argv("sb-sbalice-p-0a1b2c", "sbalice", "p", "42", "/home/sbalice", ".ssh/authorized_keys")
    at = argv.index("instance://sb-sbalice-p-0a1b2c")
    assert argv[:2] == ["apptainer", "exec"]
    assert argv[at + 1:at + 7] == [SSHD, "-i", "-f", "/dev/null", "-h",
                                   "/home/sbalice/.sbroker/ssh/ssh_host_ed25519_key"]
    o = options(argv)
    assert o["AllowUsers"] == "sbalice"
    assert o["AuthenticationMethods"] == "publickey"
    assert o["PasswordAuthentication"] == "no"
    assert o["UsePAM"] == "no"
    assert (o["AllowTcpForwarding"], o["AllowStreamLocalForwarding"], o["AllowAgentForwarding"]) == ("yes",) * 3
    assert (o["X11Forwarding"], o["PermitTunnel"], o["GatewayPorts"]) == ("no",) * 3
    assert o["Subsystem"] == "sftp internal-sftp"
    assert o["SetEnv"] == "SLURM_JOB_ID=42 SLURM_JOBID=42 SBROKER_PROJECT=p"


@pytest.mark.parametrize("bad", [("sbalice; rm", "p", "42"), ("sbalice", "p x", "42"), ("sbalice", "p", "42 1")])
def test_sshd_argv_refuses_names_that_would_change_its_settings(bad):
    user, project, job = bad
    with pytest.raises(ValueError):
        instance_sshd_argv("sb-sbalice-p-0a1b2c", user, project, job, "/home/sbalice", ".ssh/authorized_keys")


def test_the_host_key_is_made_once_0600_and_kept(tmp_path):
    line = sshendpoint.ensure_host_key(str(tmp_path))
    key = tmp_path / ".sbroker/ssh/ssh_host_ed25519_key"
    assert line.startswith("ssh-ed25519 ")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert oct(key.parent.stat().st_mode & 0o777) == "0o700"
    assert sshendpoint.ensure_host_key(str(tmp_path)) == line


def test_a_host_key_that_is_not_one_is_one_line_naming_it(tmp_path):
    key = tmp_path / ".sbroker/ssh/ssh_host_ed25519_key"
    key.parent.mkdir(parents=True)
    key.write_text("x")
    (tmp_path / ".sbroker/ssh/ssh_host_ed25519_key.pub").write_text("garbage\n")
    with pytest.raises(sshendpoint.EndpointError, match="not an OpenSSH public key"):
        sshendpoint.ensure_host_key(str(tmp_path))


def test_ssh_config_prints_a_proxycommand_entry_and_the_known_hosts_line(tmp_path):
    out = io.StringIO()
    assert sshendpoint.ssh_config(str(tmp_path), "sbalice", "proj", ["--login", "login.example.org"], out) == 0
    text = out.getvalue()
    public = sshendpoint.ensure_host_key(str(tmp_path))
    assert "Host login-proj\n" in text
    assert "    ProxyCommand ssh -T -l sbalice login.example.org @proj sbroker ssh-proxy\n" in text
    assert "    HostKeyAlias sbroker.sbalice.login.example.org\n" in text
    assert f"#    sbroker.sbalice.login.example.org {public}\n" in text


@pytest.mark.parametrize("args", [["--host", "a b"], ["--login", "x\nProxyCommand evil"], ["--bogus"]])
def test_ssh_config_refuses_words_that_would_go_into_a_config_file_badly(tmp_path, args):
    with pytest.raises(sshendpoint.EndpointError, match="ssh-config: unknown or bad argument"):
        sshendpoint.ssh_config(str(tmp_path), "sbalice", None, args, io.StringIO())


def test_an_unknown_reserved_word_is_one_line_and_status_2(capsys):
    assert login.builtin(["rm", "-rf"], None) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ssh-proxy" in err and "ssh-config" in err


def test_the_login_client_stays_standard_library_only_with_the_endpoint():
    code = ("import sys; import broker.login, broker.sshendpoint; "
            "bad = [m for m in ('anyio', 'structlog', 'asyncssh') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("value", ["a b", "../x", "%x/keys", 7])
def test_authorized_keys_setting_is_one_plain_path(value):
    with pytest.raises(ConfigError, match="transfer.authorized_keys"):
        parse({"transfer": {"authorized_keys": value}})


def test_authorized_keys_setting_takes_sshd_tokens():
    config = parse({"container": {"image": "/images/base.sif"}, "transfer": {"authorized_keys": "/etc/ssh/keys/%u"}})
    assert config.ssh_authorized_keys == "/etc/ssh/keys/%u"


def test_the_full_cli_prints_the_same_entry_for_the_caller(tmp_path, monkeypatch, capsys):
    import pwd
    from types import SimpleNamespace

    from broker.cli import main

    monkeypatch.setattr(pwd, "getpwuid", lambda uid: SimpleNamespace(pw_dir=str(tmp_path), pw_name="sbalice"))
    assert main(["ssh-config", "--project", "proj", "--login", "login.example.org", "--host", "hpc"]) == 0
    out = capsys.readouterr().out
    assert "Host hpc\n" in out
    assert "    ProxyCommand ssh -T -l sbalice login.example.org @proj sbroker ssh-proxy\n" in out
    assert (tmp_path / ".sbroker/ssh/ssh_host_ed25519_key").exists()


def test_ssh_config_keeps_the_profile_asked_for(tmp_path):
    out = io.StringIO()
    assert sshendpoint.ssh_config(str(tmp_path), "sbalice", "proj", ["--login", "login.example.org"], out, "gpu") == 0
    assert "    ProxyCommand ssh -T -l sbalice login.example.org @proj:gpu sbroker ssh-proxy\n" in out.getvalue()
    out = io.StringIO()
    sshendpoint.ssh_config(str(tmp_path), "sbalice", None, ["--login", "l"], out, "gpu")
    assert "    ProxyCommand ssh -T -l sbalice l @:gpu sbroker ssh-proxy\n" in out.getvalue()
    with pytest.raises(sshendpoint.EndpointError, match="profile"):
        sshendpoint.ssh_config(str(tmp_path), "sbalice", None, [], io.StringIO(), "a b")
