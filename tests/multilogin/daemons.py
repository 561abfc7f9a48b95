"""Two brokers on two login nodes of the test bed.

login1 is the machine itself (the broker the other suites use: ``tests.integration.daemon``);
login2 is the bed's second login node (its own UTS + mount namespace, its own sshd on
``LOGIN2_SSH_PORT``): its broker runs there, at the same socket and state paths, which are
private tmpfs in that namespace. Each broker has its own log file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import subprocess
import sys
import time

from tests.cluster import config as tb
from tests.cluster import harness
from tests.integration import daemon as d

CONFIG2 = tb.ETC / "broker-login2.toml"
LOG2 = tb.LOG / "broker-login2.log"

PING = ("import sys; sys.path.insert(0, sys.argv[1]); from broker.client import Client\n"
        "with Client(sys.argv[2], timeout=2) as c: c.request('ping')")


class Login2Broker(d.BrokerProcess):
    """The broker of login2, started inside its namespaces with ``nsenter`` (stopped as any)."""

    def start(self, timeout: float = 20.0) -> None:
        CONFIG2.write_text(d.config_text(**self.overrides))
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(tb.REPO), "LANG": "C.UTF-8"}
        log = open(LOG2, "ab")
        self.proc = subprocess.Popen(harness.on_login2(sys.executable, "-m", "broker", "serve", "--config",
                                                       str(CONFIG2)), env=env, stdout=log, stderr=log, cwd="/")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"login2 broker exited with {self.proc.returncode}; see {LOG2}")
            ping = subprocess.run(harness.on_login2(sys.executable, "-c", PING, str(tb.REPO), str(d.SOCKET)),
                                  capture_output=True, timeout=10)
            if ping.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"login2 broker did not answer within {timeout}s; see {LOG2}")


def reset_login2_state() -> None:
    if harness.login2_pid() is not None:
        subprocess.run(harness.on_login2("sh", "-c", f"rm -rf {d.STATE_DIR}/* {d.STATE_DIR}/.[!.]*"), check=False)


def sbroker2(user: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The ``sbroker`` CLI as ``user`` on login2 (its broker)."""
    argv = harness.on_login2("runuser", "-u", user, "--", "env", f"SBROKER_SOCKET={d.SOCKET}",
                             f"SLURM_CONF={tb.SLURM_CONF}", str(tb.SBROKER_BIN), *args)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")
    if check and res.returncode != 0:
        raise AssertionError(f"login2: sbroker {' '.join(args)} as {user} failed ({res.returncode}): {res.stderr}")
    return res


def sbatch_calls(log_path, offset: int = 0) -> int:
    with open(log_path, "rb") as fh:
        fh.seek(offset)
        return fh.read().count(b'"argv": ["sbatch", "--parsable"]')


@contextlib.contextmanager
def running_both(one: d.BrokerProcess, two: Login2Broker) -> Iterator[tuple[d.BrokerProcess, Login2Broker]]:
    """login1's and login2's brokers on empty state dirs, stopped and emptied afterwards."""
    d.reset_state()
    reset_login2_state()
    try:
        one.start()
        two.start()
        yield one, two
    finally:
        two.stop()
        one.stop()
        reset_login2_state()
        d.reset_state()
