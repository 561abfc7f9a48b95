"""The session agent's one requirement, python3 >= 3.9 on compute nodes: without it, one line.

The job's ``PATH`` (the broker's ``slurm.path``, exported to the job) starts with a
directory whose ``python3`` is an old one (a script that reports 3.6 and fails the version
check). The first login must fail with exactly one line naming the requirement, the node
and what was found; the session fails with that reason and no job is left.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.cluster import config as tb
from tests.fault.conftest import store_rows
from tests.integration.conftest import jobs_of
from tests.integration.daemon import BrokerProcess, reset_state
from tests.waiting import wait_for

from .conftest import ALICE

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

OLD_PYTHON_DIR = tb.ROOT / "old-python"


@pytest.fixture(scope="module")
def old_python_broker(cluster):
    OLD_PYTHON_DIR.mkdir(mode=0o755, exist_ok=True)
    fake = OLD_PYTHON_DIR / "python3"
    fake.write_text('#!/bin/sh\n[ "$1" = -V ] && echo "Python 3.6.8" && exit 0\nexit 1\n')
    fake.chmod(0o755)
    reset_state()
    proc = BrokerProcess(slurm_path=f"{OLD_PYTHON_DIR}:{tb.BIN}:/usr/local/bin:/usr/bin:/bin")
    proc.start()
    yield proc
    proc.stop()
    reset_state()


def test_a_node_without_python_3_9_fails_the_first_session_in_one_clear_line(old_python_broker):
    login = subprocess.run(tb.ssh_command(ALICE, "@oldpy", "true"), capture_output=True, text=True, timeout=180,
                           stdin=subprocess.DEVNULL)
    assert login.returncode == 1, login
    # Progress lines (requested, submitted, ...) come first on a non-terminal; then the one error.
    lines = [line for line in login.stderr.splitlines() if line.strip()]
    failures = [line for line in lines if "python3" in line]
    assert failures == lines[-1:], lines
    assert failures[0].startswith("sbroker: ")
    assert "the session agent needs python3 >= 3.9 on the PATH of compute node node" in failures[0]
    assert f"found: {OLD_PYTHON_DIR}/python3 Python 3.6.8)" in failures[0]
    [session] = [r for r in store_rows().values() if r["project"] == "oldpy"]
    assert session["state"] == "failed"
    assert "the session agent needs python3 >= 3.9" in session["reason"]
    wait_for(lambda: not [j for j in jobs_of(ALICE) if j["job_id"] == session["job_id"]], 30,
             "the failed session's job to leave squeue")
