"""Run the real broker daemon (as root) against the test bed, for integration tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker.client import BrokerError, Client
from tests.cluster import config as tb

SOCKET = tb.BROKER_SOCKET
STATE_DIR = Path("/var/lib/sbroker-test")
CONFIG_PATH = tb.ETC / "broker.toml"
LOG_PATH = tb.LOG / "broker.log"


def config_text(extra_toml: str = "", **overrides: object) -> str:
    """The test bed's broker.toml; ``overrides`` are ``section_key=value`` pairs, ``extra_toml``
    is appended as is (tables the pairs cannot express, e.g. ``[profiles.NAME]``)."""
    values: dict[str, dict[str, object]] = {
        "broker": {"socket": str(SOCKET), "state_dir": str(STATE_DIR), "admin_group": tb.ADMIN_GROUP,
                   "log_level": "debug"},
        "slurm": {"partition": tb.PARTITION, "time_limit": "2:00:00", "cpus": 1, "memory_gb": 1,
                  "slurm_conf": str(tb.SLURM_CONF), "path": f"{tb.BIN}:/usr/local/bin:/usr/bin:/bin",
                  "poll_interval": 1.0, "gone_grace": 2.0, "command_timeout": 15.0},
        "container": {"image": str(tb.IMAGES / "base.sif"), "user_dir": "/home/{user}",
                      "project_dir": "/home/{user}/proj/{project}", "default_project": "default"},
        # No spare shell by default: tests count shells and their ids; test_spare_shell turns it on.
        "timeouts": {"pending": 120, "start": 60, "detach_grace": 60, "spare_shell": False},
        # Transfers go to the allocation (what most tests exercise); the login side's tests
        # (tests/e2e/test_login_side_*.py) turn it on.
        "transfer": {"login_side": False},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("_")
        values.setdefault(section, {})[name] = value
    lines = []
    for section, table in values.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n" + extra_toml


class BrokerProcess:
    def __init__(self, **overrides: object) -> None:
        self.overrides = overrides
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        from tests.cluster import demo

        demo.stop_broker()  # a `make demo` broker would hold the socket and the state dir
        CONFIG_PATH.write_text(config_text(**self.overrides))
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(tb.REPO), "LANG": "C.UTF-8"}
        log = open(LOG_PATH, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "broker", "serve", "--config", str(CONFIG_PATH)],
                                     env=env, stdout=log, stderr=log, cwd="/")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}; see {LOG_PATH}:\n{tail()}")
            try:
                with Client(str(SOCKET), timeout=2) as c:
                    c.request("ping")
                    pid = peer_pid(c.sock)
            except (BrokerError, OSError):
                time.sleep(0.1)
                continue
            if pid != self.proc.pid:  # a leftover broker (an interrupted run) holds the socket
                self.stop()
                raise RuntimeError(f"another broker (pid {pid}) answers on {SOCKET}; stop it first")
            return
        raise RuntimeError(f"broker did not answer on {SOCKET} within {timeout}s:\n{tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


def peer_pid(sock) -> int:
    import socket
    import struct

    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def tail(lines: int = 40) -> str:
    try:
        return "\n".join(LOG_PATH.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no broker log)"


def cancel_all_test_jobs() -> None:
    for user in (*tb.USERS, tb.ADMIN):
        subprocess.run(tb.as_user(user, "scancel", "-u", user), capture_output=True, timeout=30)


def wait_no_jobs(timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "--noheader", "-u", ",".join((*tb.USERS, tb.ADMIN)), "-o", "%i"],
                             capture_output=True, text=True, env=tb.slurm_env()).stdout
        if not out.strip():
            return
        time.sleep(0.3)


def reset_state() -> None:
    """Fresh state dir and no leftover jobs: each test module starts from nothing."""
    cancel_all_test_jobs()
    wait_no_jobs()
    # Empty it, never remove it: it is the mount point of the second login node's private
    # state dir, and removing a mount point detaches the mounts on it in every namespace.
    subprocess.run(["sh", "-c", 'rm -rf -- "$1"/* "$1"/.[!.]*', "-", str(STATE_DIR)], check=True)


def client_as(user: str) -> list[str]:
    """argv prefix to run the installed ``sbroker`` CLI as ``user`` against the test broker."""
    return ["runuser", "-u", user, "--", "env", f"SBROKER_SOCKET={SOCKET}", f"SLURM_CONF={tb.SLURM_CONF}",
            str(tb.SBROKER_BIN)]


__all__ = ["BrokerProcess", "client_as", "config_text", "reset_state", "tail"]
