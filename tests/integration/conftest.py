"""Fixtures for tests that run the real broker daemon against the real test bed."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from tests.cluster import config as tb
from tests.waiting import wait_for

from .daemon import SOCKET, BrokerProcess, client_as, reset_state


@pytest.fixture(scope="module")
def broker(cluster) -> Iterator[BrokerProcess]:
    """A fresh daemon with an empty state dir and no leftover jobs; stopped afterwards."""
    reset_state()
    proc = BrokerProcess()
    proc.start()
    yield proc
    proc.stop()
    reset_state()


ALICE, BOB = tb.USERS


def sbroker(user: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the ``sbroker`` CLI as ``user`` (SO_PEERCRED identifies them to the daemon)."""
    result = subprocess.run([*client_as(user), *args], capture_output=True, text=True, timeout=timeout,
                            cwd="/")
    if check and result.returncode != 0:
        raise AssertionError(f"sbroker {' '.join(args)} as {user} failed ({result.returncode}): {result.stderr}")
    return result


def sbroker_json(user: str, *args: str) -> object:
    return json.loads(sbroker(user, *args, "--json").stdout)


def jobs_of(user: str, states: str = "PENDING,RUNNING,CONFIGURING,COMPLETING") -> list[dict[str, str]]:
    """What SLURM itself says the user has (not what the broker says), from ``squeue --json``:
    job names and comments are users' text (hostile tests put line boundaries in them), so a
    text format could be forged. ``states``: a comma list, or ``all``."""
    out = subprocess.run(["squeue", "--json"], capture_output=True, text=True, env=tb.slurm_env(),
                         check=True).stdout
    wanted = None if states == "all" else set(states.split(","))
    jobs = []
    for job in sorted(json.loads(out)["jobs"], key=lambda j: j["job_id"]):
        if job["user_name"] != user or (wanted is not None and job["job_state"] not in wanted):
            continue
        jobs.append({"job_id": str(job["job_id"]), "state": job["job_state"], "comment": job["comment"] or ""})
    return jobs


def ensure_as(user: str, project: str) -> dict:
    """Run an ``ensure`` as ``user`` through a real socket connection from that uid."""
    result = subprocess.run(
        ["runuser", "-u", user, "--", "env", f"SBROKER_SOCKET={SOCKET}", "/usr/bin/python3", "-c",
         "import json,sys; sys.path.insert(0, sys.argv[1]); from broker.client import Client, BrokerError\n"
         "try:\n  print(json.dumps(Client().request('ensure', project=sys.argv[2])))\n"
         "except BrokerError as e:\n  print(json.dumps({'type':'error','code':e.code,'message':e.message}))",
         str(tb.REPO), project],
        capture_output=True, text=True, timeout=180, cwd="/")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_node(user: str, session_id: str) -> object:
    """The session's node as ``show`` reports it, once the poller has filled it in (≤ 5 s)."""
    return wait_for(lambda: sbroker_json(user, "show", session_id)["node"], 5, "the node of the session",
                    interval=0.1)


def tagged_jobs(user: str) -> set[str]:
    """Ids of jobs SLURM has for ``user`` in any state that carry the broker's tag."""
    return {j["job_id"] for j in jobs_of(user, states="all") if j["comment"].startswith("sbroker/v1")}
