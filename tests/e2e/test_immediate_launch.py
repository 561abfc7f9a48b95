"""``[slurm] launch = "immediate"`` (issue 17, item 5) on the real bed, through the real sshd.

The session's job is an interactive allocation (``salloc --no-shell --immediate``, no batch
step) and its start script runs as the allocation's first step, ``srun --overlap`` held by a
process outside the broker (``setsid``: the bed has no systemd). What must hold:

* a login gets a shell in that allocation, the job carries ``launch=immediate``;
* a ``kill -9`` of the broker leaves the holder, the step, the shell and its variables alone;
* ending the session releases the allocation and leaves no holder on the login node and no
  agent on the compute node;
* a lost holder (the login node that made the session gone) leaves the step and the session
  running; a step that then ends with no holder to release the allocation is released by the
  broker, with a reason that says so, and the next login starts a new session;
* when the partition is busy the session is queued as a batch job instead of failing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pexpect
import pytest

from tests.cluster import config as tb
from tests.cluster import harness
from tests.fault.conftest import store_rows
from tests.integration.conftest import jobs_of, sbroker, sbroker_json
from tests.integration.daemon import LOG_PATH, BrokerProcess, cancel_all_test_jobs, reset_state, wait_no_jobs
from tests.waiting import wait_for

from .conftest import ALICE, BOB, PROMPT_RE, ssh

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def immediate_broker(cluster):
    cancel_all_test_jobs()
    reset_state()
    proc = BrokerProcess(slurm_launch="immediate", slurm_holder="setsid")
    proc.start()
    yield proc
    proc.stop()
    cancel_all_test_jobs()
    reset_state()


def steps_of(job_id: str) -> list[str]:
    out = subprocess.run(["squeue", "--noheader", "--steps", f"--jobs={job_id}", "--format=%i %j"],
                         capture_output=True, text=True, env=tb.slurm_env(), timeout=30)
    return sorted(line.strip() for line in out.stdout.splitlines() if line.strip())


def holders(job_id: str) -> list[int]:
    """The login node's processes holding the job's agent step (``srun --jobid=J``, any user)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if args and os.path.basename(args[0]) == b"srun" and f"--jobid={job_id}".encode() in args \
                and b"--job-name=sbroker-agent" in args:
            found.append(int(entry))
    # srun forks a helper of its own: keep the one whose parent is not an srun of the set.
    return [pid for pid in found if _ppid(pid) not in found]


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rpartition(")")[2].split()[1])
    except OSError:
        return 0


def session_of(project: str) -> dict:
    [session] = [s for s in sbroker_json(ALICE, "ls", "--json") if s["project"] == project]
    return session


def ssh_shell(project: str) -> pexpect.spawn:
    argv = tb.ssh_command(ALICE, f"@{project}", tty=True)
    child = pexpect.spawn(argv[0], argv[1:], timeout=60, dimensions=(24, 100))
    child.send(b"PS1='E2E-PROMPT> '; PROMPT_COMMAND=\r")
    child.expect(PROMPT_RE, timeout=120)
    child.expect(PROMPT_RE)
    return child


def test_a_login_gets_a_shell_in_an_immediate_allocation_with_its_agent_as_the_first_step(immediate_broker):
    done = ssh(ALICE, "@imm", "echo job=$SLURM_JOB_ID host=$(hostname)")
    assert done.returncode == 0, done.stderr
    job_id, host = re.fullmatch(rb"job=(\d+) host=(\S+)\n", done.stdout).groups()
    job_id = job_id.decode()
    assert host.decode() in tb.NODES
    [job] = [j for j in jobs_of(ALICE) if j["job_id"] == job_id]
    assert job["state"] == "RUNNING" and " launch=immediate" in job["comment"] and " project=imm " in job["comment"]
    # No batch step: the allocation's first step is the agent, held on this login node.
    assert f"{job_id}.0 sbroker-agent" in steps_of(job_id)
    assert not [s for s in steps_of(job_id) if s.startswith(f"{job_id}.batch")]
    assert len(holders(job_id)) == 1
    assert session_of("imm")["state"] == "ready"


def test_a_broker_killed_with_9_leaves_the_holder_the_step_and_the_shell_alone(immediate_broker):
    child = ssh_shell("imm")
    try:
        child.send(b"export MARK=kept-$((6*7)); echo $$ > /tmp/imm-shell-pid\r")
        child.expect(PROMPT_RE)
        job_id = session_of("imm")["job_id"]
        [holder] = holders(job_id)
        immediate_broker.kill9()
        immediate_broker.start()
        assert holders(job_id) == [holder]
        assert f"{job_id}.0 sbroker-agent" in steps_of(job_id)
        child.send(b"echo mark=$MARK same=$( [ $$ = $(cat /tmp/imm-shell-pid) ] && echo yes || echo no)\r")
        child.expect(rb"mark=(\S+) same=(\w+)")
        assert child.match.group(1, 2) == (b"kept-42", b"yes")
        child.send(b"exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    session = session_of("imm")
    assert (session["state"], session["job_id"]) == ("ready", job_id)
    # And the restarted broker serves the next command in the same allocation.
    again = ssh(ALICE, "@imm", "echo $SLURM_JOB_ID")
    assert again.stdout.decode().strip() == job_id, again.stderr


def test_ending_the_session_releases_the_allocation_and_leaves_no_holder_or_agent(immediate_broker):
    done = ssh(ALICE, "@ends", "echo $SLURM_JOB_ID")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.decode().strip()
    session = session_of("ends")
    node = sbroker_json(ALICE, "show", session["id"])["node"]
    assert holders(job_id)
    sbroker(ALICE, "kill", session["id"])
    wait_for(lambda: not [j for j in jobs_of(ALICE) if j["job_id"] == job_id], 60, "the allocation to end")
    wait_for(lambda: not holders(job_id), 30, "the holder to exit")
    left = subprocess.run(harness.on_node(node, "ps", "-u", ALICE, "-o", "args="), capture_output=True, text=True,
                          timeout=30).stdout
    assert "sbroker-agent." not in left, left


def test_a_lost_holder_leaves_the_session_running_and_a_step_that_ends_without_it_releases_the_allocation(
        immediate_broker):
    done = ssh(ALICE, "@lost", "echo $SLURM_JOB_ID")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.decode().strip()
    session = session_of("lost")
    [holder] = holders(job_id)
    # As a lost login node does: the holder and its srun die at once, nothing runs after them.
    os.killpg(os.getpgid(holder), signal.SIGKILL)
    wait_for(lambda: not holders(job_id), 10, "the holder to be gone")
    # The step's output goes to a file, so slurmstepd needs nothing from srun: the session goes on.
    again = ssh(ALICE, "@lost", "echo $SLURM_JOB_ID")
    assert (again.returncode, again.stdout.decode().strip()) == (0, job_id), again.stderr
    assert f"{job_id}.0 sbroker-agent" in steps_of(job_id)
    # The step then ends (here: cancelled by its owner) with no holder left to release the
    # allocation: the broker sees it running without its agent step and releases it.
    subprocess.run(["runuser", "-u", ALICE, "--", "scancel", f"{job_id}.0"], env=tb.slurm_env(), cwd="/",
                   check=True, timeout=30)
    wait_for(lambda: not [j for j in jobs_of(ALICE) if j["job_id"] == job_id], 60,
             "the broker to release the allocation whose agent step is gone")
    ended = wait_for(lambda: [r for r in store_rows().values()
                              if r["id"] == session["id"] and r["state"] in ("ended", "failed")], 30,
                     "the session to end")
    assert "agent step ended" in ended[0]["reason"], ended
    fresh = ssh(ALICE, "@lost", "echo $SLURM_JOB_ID")
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.decode().strip() not in ("", job_id)


def test_a_busy_partition_queues_the_session_as_a_batch_job(immediate_broker):
    # Bob holds every CPU of the partition: an immediate allocation cannot be granted now.
    cancel_all_test_jobs()  # the module's earlier sessions hold CPUs a 64-CPU job needs
    wait_no_jobs()
    hogs = []
    for _ in tb.NODES:
        hog = subprocess.run(tb.as_user(BOB, "sbatch", "--parsable", "--chdir=/tmp", "--output=/dev/null",
                                        f"--partition={tb.PARTITION}", f"--cpus-per-task={tb.NODE_CPUS}",
                                        "--mem=1G", "--time=5", "--wrap=sleep 600"),
                             capture_output=True, text=True, env=tb.slurm_env(), timeout=30)
        assert hog.returncode == 0, hog.stderr
        hogs.append(hog.stdout.strip())
    try:
        wait_for(lambda: len([j for j in jobs_of(BOB, "RUNNING") if j["job_id"] in hogs]) == len(hogs), 30,
                 "bob's jobs to hold the nodes")
        login = subprocess.Popen(tb.ssh_command(ALICE, "@busy", "echo job=$SLURM_JOB_ID"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        pending = wait_for(lambda: [j for j in jobs_of(ALICE, "PENDING") if " project=busy " in j["comment"]], 60,
                           "alice's session to be queued")
        assert " launch=immediate" not in pending[0]["comment"]  # a batch job, waiting its turn
        assert "immediate_not_granted" in LOG_PATH.read_text(errors="replace")
    finally:
        subprocess.run(["scancel", *hogs], env=tb.slurm_env(), timeout=30)
    out, err = login.communicate(timeout=120)
    assert login.returncode == 0, err
    assert out.decode().strip() == f"job={pending[0]['job_id']}"
