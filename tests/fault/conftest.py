"""Helpers for the fault and security suite (real cluster unless a test says otherwise).

Gates: to stop the broker *inside* a given step deterministically, the broker and its
jobs get a PATH whose first directory (:data:`GATE_BIN`) holds small wrappers around
``sbatch``, ``squeue``, ``scancel`` and ``apptainer``. A wrapper waits while its gate file
under :data:`GATE_DIR` exists and then runs the real program. A wrapper whose parent
(the broker) died while it waited exits without running the command, so a ``kill -9``
during a gated step leaves the world exactly as if the broker had died at that point.
The ``sbatch`` gate is after the real submission (job exists, broker never hears its
id); the ``apptainer`` gate only holds ``instance start`` (the job is RUNNING, no marker).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from tests.cluster import config as tb
from tests.integration.daemon import LOG_PATH, SOCKET, STATE_DIR, BrokerProcess, reset_state
from tests.waiting import wait_for

ALICE, BOB = tb.USERS
# On storage the compute nodes share (their /run is their own): the apptainer gate runs in jobs.
GATE_BIN = tb.ROOT / "fault" / "bin"
GATE_DIR = tb.ROOT / "fault" / "gates"
REAL = {"sbatch": shutil.which("sbatch") or "/usr/bin/sbatch",
        "squeue": shutil.which("squeue") or "/usr/bin/squeue",
        "scancel": shutil.which("scancel") or "/usr/bin/scancel",
        "apptainer": str(tb.BIN / "apptainer")}
GATE_MAX_WAIT = 120

_WRAPPER = r"""#!/bin/bash
# sbroker fault-suite gate wrapper for {name} (tests/fault/conftest.py)
gate={gate_dir}/{name}
parent=$PPID
wait_gate() {{
    local n=0
    while [ -e "$gate" ] && [ "$n" -lt {max_ticks} ]; do
        sleep 0.05; n=$((n + 1))
        if [ "$(ps -o ppid= -p $$ | tr -d ' ')" != "$parent" ]; then exit 99; fi
    done
}}
{body}
"""
_BODIES = {
    # only the poller's squeue is held (a `--json` scan, before a submission, is not the poll)
    "squeue": 'case " $* " in *" --json "*) ;; *) wait_gate ;; esac\nexec {real} "$@"',
    "scancel": 'wait_gate\nexec {real} "$@"',
    # after the real submission: the job exists, its id reaches the broker only after the gate
    # (a --test-only forecast submits nothing: never held)
    "sbatch": 'case " $* " in *" --test-only "*) exec {real} "$@" ;; esac\n'
              'out=$({real} "$@"); rc=$?\nwait_gate\nprintf "%s\\n" "$out"\nexit $rc',
    # only `instance start` is held (inside the job: the parent is the start script)
    "apptainer": 'if [ "$1 $2" = "instance start" ]; then wait_gate; fi\nexec {real} "$@"',
}


def install_gates() -> None:
    GATE_BIN.mkdir(parents=True, exist_ok=True)
    GATE_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(GATE_BIN.parent, 0o755)
    os.chmod(GATE_BIN, 0o755)
    os.chmod(GATE_DIR, 0o755)
    for name, body in _BODIES.items():
        path = GATE_BIN / name
        path.write_text(_WRAPPER.format(name=name, gate_dir=GATE_DIR, max_ticks=GATE_MAX_WAIT * 20,
                                        body=body.format(real=REAL[name])))
        os.chmod(path, 0o755)


def gate_path() -> str:
    return f"{GATE_BIN}:{tb.BIN}:/usr/local/bin:/usr/bin:/bin"


def close_gate(name: str) -> None:
    (GATE_DIR / name).touch()


def open_gate(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (GATE_DIR / name).unlink()


def open_all_gates() -> None:
    for name in _BODIES:
        open_gate(name)


# ------------------------------------------------------------------ SLURM / store views

def squeue(*args: str) -> str:
    return subprocess.run([REAL["squeue"], "--noheader", *args], capture_output=True, text=True,
                          env=tb.slurm_env(), timeout=30).stdout


def active_tagged_jobs() -> list[dict[str, str]]:
    """Every broker-tagged job of the test users that SLURM has in an active state (read from
    ``squeue --json``: comments are users' text, a text format could be forged)."""
    active = {"PENDING", "RUNNING", "CONFIGURING", "SUSPENDED", "REQUEUED"}
    data = json.loads(subprocess.run([REAL["squeue"], "--json"], capture_output=True, text=True,
                                     env=tb.slurm_env(), timeout=30).stdout)
    jobs = []
    for job in sorted(data["jobs"], key=lambda j: j["job_id"]):
        comment = job["comment"] or ""
        if job["user_name"] not in tb.USERS or job["job_state"] not in active \
                or not comment.startswith("sbroker/v1"):
            continue
        tags = dict(w.split("=", 1) for w in comment.split()[1:] if "=" in w)
        jobs.append({"job_id": str(job["job_id"]), "state": job["job_state"], "user": job["user_name"], **tags})
    return jobs


def steps_of(job_id: str) -> list[str]:
    return [s.strip() for s in squeue("-s", "-j", job_id, "-o", "%i").splitlines() if s.strip()]


def interactive_steps(job_id: str) -> list[str]:
    """The job's steps other than its batch and extern steps: each is a login's or an attach's
    ``srun --overlap --pty`` to the session agent (or a command's ``srun``)."""
    return [s for s in steps_of(job_id) if not s.endswith((".batch", ".extern"))]


def store_rows() -> dict[str, dict]:
    """Every session document in the broker's SQLite store (read-only, WAL-safe)."""
    db = STATE_DIR / "sessions.db"
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return {r[0]: json.loads(r[1]) for r in con.execute("SELECT id, doc FROM sessions")}
    finally:
        con.close()


def instances_of(user: str) -> set[str]:
    """Instance names ``apptainer instance list`` gives for ``user`` on every live compute node
    (instances run on the nodes; each node's list is its own)."""
    from tests.cluster import harness

    names: set[str] = set()
    for node in harness.NODES:
        if node.slurmd_pid() is None and node.init_pid() is None:
            continue
        res = subprocess.run(harness.on_node(node.name, REAL["apptainer"], "instance", "list", "--json",
                                             user=user), capture_output=True, text=True, cwd="/", timeout=30)
        assert res.returncode == 0, res.stderr
        names |= {i["instance"] for i in json.loads(res.stdout or "{}").get("instances", [])}
    return names




def broker_log_since(offset: int) -> str:
    with open(LOG_PATH, "rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def log_offset() -> int:
    try:
        return LOG_PATH.stat().st_size
    except FileNotFoundError:
        return 0


class TomlBroker(BrokerProcess):
    """A broker whose config gets raw TOML lines added to sections (``{"container": "k = v"}``),
    for values ``config_text`` cannot express (arrays of tables)."""

    def __init__(self, extra: dict[str, str], **overrides: object) -> None:
        super().__init__(**overrides)
        self.extra = extra

    def start(self, timeout: float = 20.0) -> None:
        from tests.integration import daemon

        original = daemon.config_text

        def patched(**kw: object) -> str:
            text = original(**kw)
            for section, lines in self.extra.items():
                text = text.replace(f"[{section}]\n", f"[{section}]\n{lines}\n", 1)
            return text

        daemon.config_text = patched
        try:
            super().start(timeout)
        finally:
            daemon.config_text = original


PEER = Path(__file__).with_name("peer.py")


def login_terminal(user: str, project: str) -> pexpect.spawn:
    """An interactive login as sshd's ForceCommand runs it: ``sbroker login`` in a pty, as
    ``user``, for ``project`` (``SBROKER_PROJECT``, as ``AcceptEnv`` passes it). It sends
    ``ensure`` with ``attach`` and runs the ``srun ... agent.py attach`` the broker names; not
    waited for (have the shell answer something)."""
    return pexpect.spawn("runuser", ["-u", user, "--", "env", "TERM=xterm", f"SBROKER_PROJECT={project}",
                                     str(tb.SBROKER_BIN), "login", "--socket", str(SOCKET)],
                         timeout=30, cwd="/", dimensions=(24, 80))


def peer_argv(user: str, *args: str) -> list[str]:
    return ["runuser", "-u", user, "--", "/usr/bin/python3", str(PEER), str(SOCKET), *args]


def request_as(user: str, message: dict | str, timeout: float = 60) -> list[dict]:
    """Send one request (a dict, or raw JSON text sent verbatim) as ``user``; all replies."""
    raw = message if isinstance(message, str) else json.dumps(message)
    res = subprocess.run(peer_argv(user, "request", raw), capture_output=True, text=True, timeout=timeout,
                         cwd="/")
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def scontrol(*args: str) -> None:
    subprocess.run(["scontrol", *args], check=True, env=tb.slurm_env(), capture_output=True, timeout=30)


@pytest.fixture
def fresh(cluster) -> Iterator[None]:
    """Empty state dir, no test jobs, gates open before and after."""
    install_gates()
    open_all_gates()
    reset_state()
    yield
    open_all_gates()
    reset_state()


@pytest.fixture
def gated_broker(fresh) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(slurm_path=gate_path(), slurm_poll_interval=0.5, slurm_gone_grace=1.0)
    proc.start()
    yield proc
    open_all_gates()
    proc.stop()


__all__ = ["ALICE", "BOB", "SOCKET", "STATE_DIR", "BrokerProcess", "wait_for"]
