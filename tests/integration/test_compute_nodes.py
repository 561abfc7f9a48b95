"""Sessions on real compute nodes: the job runs apart from the login node, and its files are
where both sides can reach them.

* On each node (its partition of the same name): the shell's hostname and
  ``SLURMD_NODENAME`` are the node's, and the job's output file lies in ``slurm.job_dir``,
  writable by the user on the node and readable on the login node, owned by the user.
* A job dir the user cannot create or write fails the session in under 5 s with a reason
  naming ``slurm.job_dir``; one that is missing on the node (a login-only path) fails with
  SLURM's ``JobLaunchFailure`` and the probable cause, also in under 5 s; a node-local one
  (``/tmp``) is named as such well before the start timeout.
* After a session ends, no process of it is left on its node (every process the user
  started there, double-forked ones included).
"""

from __future__ import annotations

import pwd
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.cluster import config as tb
from tests.cluster import harness
from tests.waiting import wait_for

from .conftest import ALICE, ensure_as, sbroker, sbroker_json, wait_node
from .daemon import BrokerProcess, reset_state

pytestmark = pytest.mark.cluster

#: The issue's bound for a job dir the session cannot use.
JOB_DIR_FAILURE_BOUND = 5.0


def ssh(user: str, *remote: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(tb.ssh_command(user, *remote), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_broker(cluster):
    """Start a broker with config overrides; stop it and clean up afterwards."""
    started: list[BrokerProcess] = []

    def start(**overrides: object) -> BrokerProcess:
        reset_state()
        proc = BrokerProcess(**overrides)
        proc.start()
        started.append(proc)
        return proc
    yield start
    for proc in started:
        proc.stop()
    reset_state()


@pytest.mark.parametrize("node", list(tb.NODES))
def test_shell_runs_on_the_compute_node_and_its_job_file_is_shared(run_broker, node):
    run_broker(slurm_partition=node)
    project = f"cn{node[-1]}"
    session = ensure_as(ALICE, project)["session"]
    assert wait_node(ALICE, session["id"]) == node
    res = ssh(ALICE, f"@{project}", 'echo "$(hostname) $SLURMD_NODENAME $SLURM_JOB_ID"')
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [node, node, session["job_id"]]

    log = Path(sbroker_json(tb.ADMIN, "show", session["id"])["log_path"])
    home = Path(f"/home/{ALICE}")
    assert log.parent == home / ".sbroker" / "jobs"
    # Written by the job on the node, as the user; read here on the login node.
    st = log.stat()
    assert st.st_uid == pwd.getpwnam(ALICE).pw_uid
    assert log.parent.stat().st_mode & 0o077 == 0
    assert "INSTANCE_READY" in subprocess.run(tb.as_user(ALICE, "cat", str(log)), capture_output=True,
                                              text=True, cwd="/").stdout.split()
    on_node = subprocess.run(harness.on_node(node, "sh", "-c", 'test -w "$1" && hostname', "-", str(log.parent),
                                             user=ALICE), capture_output=True, text=True, cwd="/")
    assert on_node.stdout.strip() == node, on_node.stderr


@pytest.mark.parametrize("job_dir, why", [
    ("/opt/sbroker-testbed/etc/jobs-{user}", "slurm.job_dir: cannot create /opt/sbroker-testbed/etc/jobs-sbalice"
                                             " as sbalice: mkdir: cannot create directory"),
    ("/opt/sbroker-testbed/etc", "slurm.job_dir: /opt/sbroker-testbed/etc is not writable by sbalice"),
])
def test_a_job_dir_the_user_cannot_use_fails_fast_with_its_reason(run_broker, job_dir, why):
    run_broker(slurm_job_dir=job_dir)
    started = time.monotonic()
    reply = ensure_as(ALICE, "jd")
    took = time.monotonic() - started
    assert reply["type"] == "error" and reply["message"].startswith(why), reply
    assert took < JOB_DIR_FAILURE_BOUND, took


def test_a_job_dir_missing_on_the_node_fails_fast_naming_the_probable_cause(run_broker):
    """``/tmp/...`` exists on the login node (the broker makes it, as the user) but not in
    node1's private /tmp: slurmd cannot open the job's output and the job fails at launch."""
    directory = f"/tmp/sbjobs-{uuid.uuid4().hex[:8]}"
    run_broker(slurm_job_dir=directory + "-{user}", slurm_partition="node1", slurm_poll_interval=1.0)
    try:
        started = time.monotonic()
        reply = ensure_as(ALICE, "jdm")
        took = time.monotonic() - started
        assert reply["type"] == "error", reply
        assert reply["message"] == (
            "job failed (JobLaunchFailure) before the instance was ready: probably slurm.job_dir"
            f" ({directory}-{ALICE}) is missing or not writable on node1 (SLURM could not open the"
            " job's output there)"), reply
        assert took < JOB_DIR_FAILURE_BOUND, took
    finally:
        subprocess.run(["rm", "-rf", f"{directory}-{ALICE}"])


def test_a_node_local_job_dir_is_named_before_the_start_timeout(run_broker):
    """With ``slurm.job_dir = /tmp`` the job runs and writes its markers into node1's own /tmp;
    the broker asks the node, finds the file there, and says job_dir is node-local."""
    run_broker(slurm_job_dir="/tmp", slurm_partition="node1", timeouts_start=60)
    started = time.monotonic()
    reply = ensure_as(ALICE, "jdl")
    took = time.monotonic() - started
    assert reply["type"] == "error", reply
    assert " exists on node1 but not on this login node: slurm.job_dir (/tmp) is node-local" in reply["message"]
    assert took < 30, took  # the start timeout is 60 s


def test_no_process_of_an_ended_session_is_left_on_its_node(run_broker):
    """The instance daemonizes out of the job's process tree (as apptainer's does); it and
    everything in the session must still end with the job (the bed's proctrack/cgroup, as on
    production clusters; with proctrack/linuxproc this is where leftovers would show)."""
    run_broker(slurm_partition="node2")
    session = ensure_as(ALICE, "leftover")["session"]
    uid = pwd.getpwnam(ALICE).pw_uid
    node = harness.node("node2")

    def alices() -> list[int]:
        return [p for p in node.pids() if _uid(p) == uid]
    running = alices()
    assert any(session["instance"] in _cmdline(p) for p in running), [_cmdline(p) for p in running]
    sbroker(ALICE, "kill", session["id"])
    wait_for(lambda: sbroker_json(tb.ADMIN, "show", session["id"])["state"] == "ended", 30, "the session ended")
    wait_for(lambda: not alices(), 20, lambda: f"no process of {ALICE} left on node2 ({alices()})")


def _uid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
