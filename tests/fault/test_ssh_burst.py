"""50 concurrent first logins for one (user, project) through the real sshd → one job.

sshd's default ``MaxStartups 10:30:100`` drops some unauthenticated connections when
50 arrive at once; a dropped connection (ssh exit 255 before authentication, nothing
reached the broker) is retried with a short backoff, as a user would. Every login must
finally succeed, all of them in the same session, and SLURM must show exactly one job.
"""

from __future__ import annotations

import concurrent.futures
import random
import subprocess
import time

import pytest

from tests.cluster import config as tb

from .conftest import ALICE, BrokerProcess, active_tagged_jobs, store_rows

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

N = 50
PROJECT = "burst50"


def login(i: int) -> tuple[int, int, str, str]:
    attempts = 0
    while True:
        attempts += 1
        res = subprocess.run(tb.ssh_command(ALICE, f"@{PROJECT}", "echo", f"ok-{i}", "$SBROKER_PROJECT"),
                             capture_output=True, text=True, timeout=180)
        dropped = res.returncode == 255 and not res.stdout and (
            "closed by" in res.stderr or "reset by" in res.stderr or "kex_exchange_identification" in res.stderr
            or "Connection refused" in res.stderr)
        if not dropped or attempts >= 20:
            return attempts, res.returncode, res.stdout, res.stderr
        time.sleep(random.uniform(0.2, 1.0))


@pytest.mark.timeout(600)
def test_fifty_concurrent_ssh_first_logins_make_one_job(fresh):
    proc = BrokerProcess()
    proc.start()
    try:
        before = {j["job_id"] for j in active_tagged_jobs()}
        with concurrent.futures.ThreadPoolExecutor(N) as pool:
            results = list(pool.map(login, range(N)))
        failures = [(i, r) for i, r in enumerate(results) if r[1] != 0 or r[2].split() != [f"ok-{i}", PROJECT]]
        assert not failures, failures[:5]
        jobs = [j for j in active_tagged_jobs() if j["job_id"] not in before]
        assert len(jobs) == 1, jobs
        assert jobs[0]["user"] == ALICE and jobs[0]["project"] == PROJECT
        sessions = [r for r in store_rows().values() if r["project"] == PROJECT]
        assert len(sessions) == 1 and sessions[0]["job_id"] == jobs[0]["job_id"], sessions
        retried = sum(r[0] - 1 for r in results)
        print(f"{N} logins, {retried} retries after sshd dropped a connection")
    finally:
        proc.stop()
