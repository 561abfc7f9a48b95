"""Issue 16, queue feedback on the real bed: a session that must wait says why, when SLURM expects
it to start and how many jobs are ahead; ^C while it waits cancels the submission of the login
that made it, unless another login waits for it too.

node1's two fake GPUs are held by a job of sbbob, and another of his jobs waits for one: a
session of profile ``n1gpu`` (partition node1, gres gpu:1) must wait behind both.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pexpect
import pytest

from tests.cluster import config as tb
from tests.integration.conftest import jobs_of, sbroker, sbroker_json
from tests.integration.daemon import BrokerProcess, reset_state
from tests.waiting import wait_for

from .conftest import ALICE, ssh_argv

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BOB = tb.USERS[1]
PROFILES = """
[profiles.cpu]
default = true

[profiles.n1gpu]
partition = "node1"
gres = "gpu:1"
"""


def submit_as(user: str, *args: str) -> str:
    out = subprocess.run(tb.as_user(user, "sbatch", "--parsable", "--chdir=/tmp", "--output=/dev/null", *args),
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return out.strip().split(";")[0]


def state_of(job_id: str) -> str:
    return subprocess.run(["squeue", "--noheader", "--states=all", f"--jobs={job_id}", "--format=%T"],
                          capture_output=True, text=True, env=tb.slurm_env(), timeout=30).stdout.strip()


@pytest.fixture(scope="module")
def busy_node1(cluster) -> Iterator[BrokerProcess]:
    reset_state()
    holder = submit_as(BOB, "-p", "node1", "--gres=gpu:2", "-t", "5", "--wrap", "sleep 300")
    wait_for(lambda: state_of(holder) == "RUNNING", 20, f"bob's job {holder} holding node1's GPUs to run")
    waiter = submit_as(BOB, "-p", "node1", "--gres=gpu:1", "-t", "5", "--wrap", "sleep 1")
    wait_for(lambda: state_of(waiter) == "PENDING", 10, f"bob's job {waiter} to wait")
    proc = BrokerProcess(extra_toml=PROFILES)
    proc.start()
    yield proc
    proc.stop()
    reset_state()


def alice_jobs() -> list[str]:
    return [j["job_id"] for j in jobs_of(ALICE)]


def waiting_login(project: str) -> pexpect.spawn:
    argv = ssh_argv(ALICE, f"@{project}:n1gpu", tty=True)
    return pexpect.spawn(argv[0], argv[1:], timeout=30)


def test_a_waiting_session_shows_forecast_reason_position_and_c_cancels_it(busy_node1):
    child = waiting_login("queued")
    try:
        child.expect(rb"partition node1 is busy \(1 job\(s\) waiting\); SLURM expects this session to start at"
                     rb" \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
        child.expect(rb"\[1\] start with profile cpu instead\r+\n  \[c\] cancel\r+\nchoice \[g/1-1/c\]: ")
        child.send(b"g\r")
        child.expect(rb"pending \(reason: (Resources|Priority)(, expected start \d{4}-[0-9T:-]+)?,"
                     rb" about 1 job\(s\) ahead; \^C cancels\)", timeout=30)
        (job,) = alice_jobs()
        child.sendintr()
        child.expect(f"sbroker: cancelled; job {job} was cancelled".encode())
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 130
    wait_for(lambda: not alice_jobs(), 20, "alice's cancelled job to leave the queue")
    assert state_of(job) == "CANCELLED"


def test_c_keeps_a_waiting_session_another_login_waits_for(busy_node1):
    maker = waiting_login("shared")
    other = None
    try:
        maker.expect(rb"choice \[g/1-1/c\]: ")
        maker.send(b"\r")  # Enter: go on and wait
        maker.expect(rb"about 1 job\(s\) ahead", timeout=30)
        (job,) = alice_jobs()
        other = waiting_login("shared")
        other.expect(rb"pending \(reason")
        maker.sendintr()
        maker.expect(b"sbroker: cancelled; another login waits for the session of shared, so it stays")
        maker.expect(pexpect.EOF)
        other.sendintr()
        other.expect(b"sbroker: cancelled; the session of shared was started by another login and stays")
        other.expect(pexpect.EOF)
    finally:
        maker.close(force=True)
        if other is not None:
            other.close(force=True)
    assert alice_jobs() == [job] and state_of(job) == "PENDING"
    sbroker(ALICE, "kill", "shared")
    wait_for(lambda: not alice_jobs(), 20, "the shared session's job to end after sbroker kill")


def test_at_the_forecast_the_login_can_take_another_profile_or_cancel(busy_node1):
    child = waiting_login("switched")
    try:
        child.expect(rb"choice \[g/1-1/c\]: ")
        child.send(b"1\r")
        child.expect([rb"\$ ", rb"# "], timeout=60)
        child.send(b"echo gpus=${CUDA_VISIBLE_DEVICES-none}\r")
        child.expect(rb"gpus=none\r\n")
        child.send(b"exit 0\r")
        child.expect(pexpect.EOF, timeout=20)
    finally:
        child.close(force=True)
    session = sbroker_json(ALICE, "show", "switched")
    assert (session["profile"], session["state"]) == ("cpu", "ready")
    partition = subprocess.run(["squeue", "--noheader", f"--jobs={session['job_id']}", "--format=%P"],
                               capture_output=True, text=True, env=tb.slurm_env(), timeout=30).stdout.strip()
    assert partition == "compute"
    before = set(alice_jobs())
    child = waiting_login("never")
    try:
        child.expect(rb"choice \[g/1-1/c\]: ")
        child.send(b"c\r")
        child.expect(b"sbroker: cancelled; nothing was submitted")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert set(alice_jobs()) == before
