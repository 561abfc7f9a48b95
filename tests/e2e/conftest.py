"""Fixtures for end-to-end tests: real ``ssh``/``scp``/``sftp``/``rsync``/asyncssh/pexpect
through the test bed's loopback sshd (ForceCommand ``sbroker login``) into real SLURM.

The broker is the real daemon (``tests.integration.daemon.BrokerProcess``), one per module,
with an empty state dir and no leftover jobs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from tests.cluster import config as tb
from tests.integration.conftest import broker  # noqa: F401  (the same module-scoped daemon)
from tests.integration.conftest import sbroker_json
from tests.integration.daemon import SOCKET

ALICE, BOB = tb.USERS
PROMPT = "E2E-PROMPT> "
PROMPT_RE = re.compile(rb"E2E-PROMPT> ")


def ssh(user: str, *remote: str, input: bytes | None = None, env: dict[str, str] | None = None,
        opts: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run real ``ssh USER@host REMOTE...`` (no tty); bytes in, bytes out."""
    argv = ["ssh", *tb.SSH_OPTS, *opts, f"{user}@{tb.SSH_HOST}", *remote]
    return subprocess.run(argv, input=input if input is not None else b"", capture_output=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def ssh_argv(user: str, *remote: str, tty: bool = True) -> list[str]:
    return tb.ssh_command(user, *remote, tty=tty)


def broker_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def sbroker_env() -> str:
    return f"SBROKER_SOCKET={SOCKET}"


def agent_status(session: str) -> dict:
    """The session agent's own status file (``{instance}.agent.json`` beside the job log, written
    0.1 s after each change: shells, writers, observers, detached), read as root."""
    shown = sbroker_json(tb.ADMIN, "show", session)
    return json.loads(Path(shown["log_path"]).with_name(f"{shown['instance']}.agent.json").read_text())
