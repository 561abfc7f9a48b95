"""Operations plane without the cluster: config keys, metrics exposition, table, systemd units, sd_notify."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.admin import COLUMNS, compact_left, format_table
from broker.agent.sessionagent import Agent as SessionAgent
from broker.agents import Agents, status_file
from broker.config import ConfigError, parse
from broker.metrics import Metrics
from broker.session import Session, State

REPO = Path(__file__).resolve().parents[2]
GOOD = {"container": {"image": "/opt/images/current.sif"}}


# ---------------------------------------------------------------- config

def test_ops_config_defaults_and_values():
    cfg = parse(GOOD)
    assert (cfg.metrics_port, cfg.audit_log, cfg.idle_timeout, cfg.idle_grace) == (0, "", 0.0, 300.0)
    assert (cfg.reaper_interval, cfg.reaper_retention, cfg.reaper_instance_check) == (600.0, 14 * 86400.0, True)
    cfg = parse({**GOOD, "broker": {"metrics_port": 9464, "audit_log": "/var/log/sbroker/audit.jsonl"},
                 "timeouts": {"idle": 3600, "idle_grace": 60, "walltime_warnings": [300, 1800]},
                 "reaper": {"interval": 0, "retention": 86400, "instance_check": False}})
    assert cfg.metrics_port == 9464 and cfg.audit_log == "/var/log/sbroker/audit.jsonl"
    assert cfg.walltime_warnings == (1800, 300)
    assert (cfg.reaper_interval, cfg.reaper_retention, cfg.reaper_instance_check) == (0.0, 86400.0, False)


def test_ops_config_bad_fields_one_line_each():
    with pytest.raises(ConfigError) as err:
        parse({**GOOD, "broker": {"metrics_port": 70000, "audit_log": "audit.jsonl"},
               "timeouts": {"idle_grace": -1, "walltime_warnings": [0]},
               "reaper": {"interval": "often", "retention": 5, "instance_check": "yes", "bogus": 1}})
    fields = sorted(p.split(":", 1)[0] for p in err.value.problems)
    assert fields == sorted(["broker.metrics_port", "broker.audit_log", "timeouts.idle_grace",
                             "timeouts.walltime_warnings", "reaper.interval", "reaper.retention",
                             "reaper.instance_check", "reaper.bogus"])


# ---------------------------------------------------------------- ls table

def test_ls_table_columns_fit_80_and_show_everything_asked_for():
    titles = [t for t, _, _ in COLUMNS]
    assert titles == ["USER", "PROJECT", "STATE", "JOB", "NODE", "PROF", "IMAGE@DIGEST", "A", "IDLE", "LEFT",
                      "AGE"]
    row = {"user": "sbalice", "project": "alpha", "state": "ready", "job_id": "4711", "node": "n1",
           "instance": "sb-sbalice-alpha-3fa9c1", "profile": "gpu", "image": "/img/base-2024.06.sif", "image_version": "v12",
           "image_digest": "sha256:abcdef0123", "attachers": 2, "idle": 75.0, "time_left": "1:59:30",
           "age": 90000.0}
    lines = format_table([row]).splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert lines[1].split() == ["sbalice", "alpha", "ready", "4711", "n1", "gpu", "v12@abcdef", "2", "1m",
                                "1h59m", "1d"]
    assert [compact_left(t) for t in ("1-02:03:04", "45:10", "0:02:00", "", "UNLIMITED")] == [
        "1d02h", "45m", "120s", "-", "UNLIMITED"]


# ---------------------------------------------------------------- metrics

def _fake_manager(tmp_path: Path) -> SimpleNamespace:
    cfg = parse({**GOOD, "broker": {"metrics_socket": str(tmp_path / "metrics.sock"), "admin_group": "nogroup"}})
    sessions = {}
    me = pwd.getpwuid(os.getuid())  # the agents' status files are read as the session's user
    for n, state in enumerate((State.READY, State.READY, State.PENDING)):
        s = Session(user=me.pw_name, uid=me.pw_uid, project=f"p{n}", instance=f"sb-{me.pw_name}-p{n}-00000{n}",
                    log_path=str(tmp_path / f"sb-{me.pw_name}-p{n}-00000{n}.log"), job_id=str(100 + n))
        s.state = state
        sessions[s.id] = s
    return SimpleNamespace(
        config=cfg, sessions=sessions, by_key={s.key: s for s in sessions.values()},
        failures={"instance failed to start": 2}, finished={"failed": 1},
        runner=SimpleNamespace(calls=collections.Counter({"squeue": 5, "sbatch": 1})),
        poll_cycles=4, poll_seconds=0.2, time_to_ready=[2.5, 3.5], controller_ok=True,
        audit=SimpleNamespace(failures=1))


def _families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _http(path: str, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def _write_agent_status(session: Session, *, writers: int = 0, observers: int = 0) -> None:
    """The status file a session agent writes beside the job log (``{instance}.agent.json``):
    a real (idle) agent's own :meth:`status`, with the terminal counts set (needs a running loop)."""
    status = SessionAgent(str(Path(session.log_path).parent)).status()
    status.update(shells=int(bool(writers or observers)), writers=writers, observers=observers, detached=0)
    Path(status_file(session)).write_text(json.dumps(status) + "\n")


async def test_metrics_endpoint_serves_parseable_text_and_refuses_garbage(tmp_path):
    """``sbroker_attached_sessions`` comes from the session agents' status files (issue 15: the
    shells live in the agents): real :class:`broker.agents.Agents` over real files here."""
    manager = _fake_manager(tmp_path)
    hub = SimpleNamespace(attach_count=7)
    agents = Agents(manager)
    watched, quiet, pending = manager.sessions.values()
    _write_agent_status(watched, writers=1)
    _write_agent_status(quiet)  # an agent with nobody attached; the pending session has no agent yet
    await agents.refresh(list(manager.sessions.values()))
    metrics = Metrics(manager, hub, None, agents)
    metrics.time_to_shell.labels("cold").observe(2.9)
    metrics.time_to_shell.labels("warm").observe(0.004)
    await metrics.start()
    path = manager.config.metrics_socket
    loop = asyncio.get_running_loop()
    try:
        reply = await loop.run_in_executor(None, _http, path, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        fam = _families(body.decode())
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fam.values() for s in f.samples}
        assert samples[("sbroker_sessions", (("state", "ready"),))] == 2
        assert samples[("sbroker_sessions", (("state", "pending"),))] == 1
        assert samples[("sbroker_sessions", (("state", "ended"),))] == 0
        assert samples[("sbroker_sessions", (("state", "failed"),))] == 1
        assert samples[("sbroker_session_failures_total", (("reason", "instance failed to start"),))] == 2
        assert samples[("sbroker_scheduler_calls_total", (("command", "squeue"),))] == 5
        assert samples[("sbroker_poll_cycle_seconds_count", ())] == 4
        assert samples[("sbroker_attaches_total", ())] == 7
        assert samples[("sbroker_attached_sessions", ())] == 1
        # An observer counts as attached too, once the agent's status is read again.
        _write_agent_status(quiet, observers=1)
        assert (await agents.status_of(quiet, max_age=0.0)).attachers == 1
        reply = await loop.run_in_executor(None, _http, path, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert b"\nsbroker_attached_sessions 2.0\n" in reply
        assert samples[("sbroker_audit_write_failures_total", ())] == 1
        assert samples[("sbroker_time_to_shell_seconds_count", (("path", "cold"),))] == 1
        assert samples[("sbroker_time_to_shell_seconds_bucket", (("le", "0.005"), ("path", "warm")))] == 1
        for garbage in (b"\x00\x01\x02garbage\r\n\r\n", b"GET\r\n\r\n", b"x" * 20000):
            reply = await loop.run_in_executor(None, _http, path, garbage)
            assert reply.startswith(b"HTTP/1.1 400"), reply[:100]
        reply = await loop.run_in_executor(None, _http, path, b"POST /metrics HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 405")
        reply = await loop.run_in_executor(None, _http, path, b"GET /admin HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 404")
        # Still serving after all that.
        reply = await loop.run_in_executor(None, _http, path, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200")
        assert oct(os.stat(path).st_mode & 0o777) == "0o660"
    finally:
        await metrics.close()
    assert not os.path.exists(path)


def test_two_metrics_objects_do_not_share_state(tmp_path):
    a, b = Metrics(_fake_manager(tmp_path)), Metrics(_fake_manager(tmp_path))
    a.time_to_shell.labels("cold").observe(1.0)
    text = b.render().decode()
    assert 'sbroker_time_to_shell_seconds_count{path="cold"} 0.0' in text


# ---------------------------------------------------------------- systemd

UNIT = REPO / "systemd" / "sbroker.service"


def _unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = collections.defaultdict(list)
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            out[key.strip()].append(value.strip())
    return out


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_unit_verifies(tmp_path):
    exe = Path("/opt/sbroker/venv/bin/sbroker")
    unit = tmp_path / "sbroker.service"
    text = UNIT.read_text()
    if not exe.exists():  # verify checks that ExecStart's binary exists; use a stand-in path
        fake = tmp_path / "sbroker"
        fake.write_text("#!/bin/sh\n")
        fake.chmod(0o755)
        text = text.replace(str(exe), str(fake))
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "sbroker.service" not in result.stderr, result.stderr  # no warnings about our unit


def test_systemd_unit_settings():
    s = _unit_settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"] and s["Restart"] == ["on-failure"]
    assert s["WatchdogSec"] and s["RuntimeDirectory"] == ["sbroker"] and s["RuntimeDirectoryMode"] == ["0755"]
    assert s["StateDirectory"] == ["sbroker"] and s["StateDirectoryMode"] == ["0711"]
    assert s["ConfigurationDirectory"] == ["sbroker"]
    caps = set(s["CapabilityBoundingSet"][0].split())
    assert {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_KILL"} <= caps
    assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"]
    assert s["ExecStart"][0].split()[1:] == ["serve"]


@pytest.mark.skipif(not shutil.which("systemd-tmpfiles"), reason="systemd-tmpfiles not installed")
def test_tmpfiles_snippet_creates_the_layout(tmp_path):
    result = subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}",
                             str(REPO / "systemd" / "sbroker.tmpfiles")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert oct((tmp_path / "var/lib/sbroker").stat().st_mode & 0o777) == "0o711"
    assert oct((tmp_path / "run/sbroker").stat().st_mode & 0o777) == "0o755"


def test_daemon_sends_ready_and_watchdog_over_a_real_notify_socket(tmp_path):
    """The real daemon process, a real datagram NOTIFY_SOCKET and WATCHDOG_USEC (no SLURM needed)."""
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(1.0)
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nsocket = "{tmp_path}/broker.sock"\nstate_dir = "{tmp_path}/state"\n'
        f'metrics_socket = "{tmp_path}/metrics.sock"\n'
        f'[slurm]\npath = "{tmp_path}/nobin"\ncommand_timeout = 2\n'
        f'[container]\nimage = "{tmp_path}/none.sif"\n')
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "LANG": "C.UTF-8",
           "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
    proc = subprocess.Popen([sys.executable, "-m", "broker", "serve", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                messages.append(sock.recv(4096).decode())
            except socket.timeout:
                if proc.poll() is not None:
                    break
                continue
            if sum("WATCHDOG=1" in m for m in messages) >= 2 and any("READY=1" in m for m in messages):
                break
        lines = [line for m in messages for line in m.splitlines()]
        assert "READY=1" in lines, (messages, proc.stderr.read1() if proc.poll() is not None else b"")
        assert lines.count("WATCHDOG=1") >= 2  # repeated, at about WATCHDOG_USEC/2
        assert lines.index("READY=1") < lines.index("WATCHDOG=1")   # ready first, then the pings
        assert any(line.startswith("STATUS=") for line in lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        tail = []
        while True:
            try:
                tail.append(sock.recv(4096).decode())
            except socket.timeout:
                break
        assert any("STOPPING=1" in m for m in tail)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


# ---------------------------------------------------------------- docs

def test_admin_docs_list_every_config_key_with_its_default():
    import re

    from broker.config import _FIELDS, Config

    text = (REPO / "docs" / "admin.md").read_text()
    defaults = Config()
    for section, key, attr, _kind in _FIELDS:
        match = re.search(rf"### `\[{section}\]`\n(.*?)(?:\n### |\Z)", text, re.S)
        assert match, f"docs/admin.md: no table for [{section}]"
        row = re.search(rf"^\| `{key}` \| ([^|]+) \|", match.group(1), re.M)
        assert row, f"docs/admin.md: [{section}] {key} is not documented"
        if attr == "image":
            continue
        default = getattr(defaults, attr)
        shown = row.group(1)
        if isinstance(default, bool):
            assert str(default).lower() in shown, (section, key, shown)
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            number = f"{int(default)}" if float(default).is_integer() else f"{default}"
            assert re.search(rf"`{number}(\.0)?`", shown), (section, key, shown)
        elif isinstance(default, tuple):
            assert ("[]" in shown) if not default else all(str(v) in shown for v in default), (section, key, shown)
        else:
            assert f'"{default}"' in shown, (section, key, shown)
