"""The test bed itself, on the real cluster: jobs as test users, srun --pty into a job,
ssh through the loopback sshd, and the harness's idempotency."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pexpect
import pytest

from tests.cluster import config as C
from tests.cluster import harness
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

ALICE, BOB = C.USERS


def home(user: str) -> str:
    return pwd.getpwnam(user).pw_dir


def run_as(user: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(C.as_user(user, *argv), cwd=home(user), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def submit(user: str, *args: str) -> str:
    p = run_as(user, "sbatch", "--parsable", *args)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def states(*jobids: str) -> dict[str, str]:
    p = subprocess.run(["squeue", "-h", "-j", ",".join(jobids), "-o", "%i %T"],
                       env=C.slurm_env(), capture_output=True, text=True, timeout=30)
    return dict(line.split() for line in p.stdout.splitlines() if line.strip())


def scancel(*jobids: str) -> None:
    subprocess.run(["scancel", *jobids], env=C.slurm_env(), capture_output=True, timeout=30)


@pytest.fixture
def alice_job():
    """A running batch job of sbalice (submitted from her home), cancelled afterwards."""
    job = submit(ALICE, "-J", "tb-alice", "-t", "10", "--wrap", "sleep 600")
    wait_for(lambda: states(job).get(job) == "RUNNING", 20, f"job {job} RUNNING")
    yield job
    scancel(job)


def test_two_compute_nodes_are_up_with_64_slots_each():
    p = subprocess.run(["sinfo", "-h", "-N", "-p", C.PARTITION, "-o", "%N %P %C %m"], env=C.slurm_env(),
                       capture_output=True, text=True, timeout=30)
    rows = [line.split() for line in p.stdout.splitlines()]
    assert [r[0] for r in rows] == list(C.NODES) and C.hostname() not in C.NODES
    for node, part, cpus, mem in rows:
        assert part == f"{C.PARTITION}*"
        assert cpus.split("/")[-1] == str(C.NODE_CPUS)
        assert int(mem) == C.NODE_MEMORY_MB


@pytest.mark.parametrize("node", list(C.NODES))
def test_a_node_has_its_own_hostname_tmp_run_and_processes(node):
    """What a job on NODE sees is the node's: hostname, an empty private /tmp, its own /run
    (no broker socket), its own process tree; /home is the login node's."""
    marker = Path("/tmp") / f"login-only-{uuid.uuid4().hex[:8]}"
    marker.write_text("x")
    try:
        tag = uuid.uuid4().hex[:8]
        job = submit(ALICE, "-p", node, "--wrap",
                     f"echo {tag} $(hostname) $SLURMD_NODENAME;"
                     f" test -e {marker} && echo tmp-shared; test -e /run/sbroker-test && echo run-shared;"
                     " ps -e -o comm= | grep -qx sshd && echo sees-sshd; true")
        out = f"{home(ALICE)}/slurm-{job}.out"
        wait_for(lambda: os.path.exists(out) and tag in open(out).read(), 20, f"{out} to be written")
        wait_for(lambda: states(job).get(job) in (None, "COMPLETED"), 20, f"job {job} done")
        assert open(out).read().split() == [tag, node, node]
    finally:
        marker.unlink()


def test_jobs_of_overlapping_partitions_share_a_node():
    """`compute` and `node1` overlap on node1: a job in each runs there at once (with
    OverSubscribe=YES, SLURM keeps a node busy in one partition away from the others)."""
    name = f"tb-overlap-{uuid.uuid4().hex[:6]}"
    a = submit(ALICE, "-J", name, "-p", C.PARTITION, "-w", "node1", "-t", "5", "--wrap", "sleep 300")
    b = submit(ALICE, "-J", name, "-p", "node1", "-t", "5", "--wrap", "sleep 300")
    try:
        wait_for(lambda: states(a, b) == {a: "RUNNING", b: "RUNNING"}, 20,
                 lambda: f"jobs {a} ({C.PARTITION}) and {b} (node1) RUNNING together: {states(a, b)}")
    finally:
        scancel(a, b)


def test_a_double_forked_process_dies_with_its_job():
    """proctrack/cgroup: a process that escaped its job's process tree still ends with it."""
    tag = f"sb-escape-{uuid.uuid4().hex[:8]}"
    job = submit(ALICE, "-p", "node1", "--wrap", f"setsid sh -c 'exec -a {tag} sleep 600 &'; sleep 1")
    wait_for(lambda: states(job).get(job) in (None, "COMPLETED"), 20, f"job {job} done")
    wait_for(lambda: not [p for p in harness.node("node1").pids() if tag in _cmdline(p)], 10,
             f"the escaped {tag} to be gone from node1")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_batch_output_lands_in_users_home():
    tag = uuid.uuid4().hex[:8]
    job = submit(ALICE, "--wrap", f"echo out-{tag} $(id -un)")
    out = f"{home(ALICE)}/slurm-{job}.out"

    def done():
        try:
            return open(out).read()
        except OSError:
            return ""
    wait_for(lambda: f"out-{tag}" in done(), 20, f"{out} to be written")
    assert done().split() == [f"out-{tag}", ALICE]


def test_srun_pty_into_running_job(alice_job):
    assert run_as(ALICE, "squeue", "-h", "-j", alice_job, "-o", "%u %T").stdout.split() \
        == [ALICE, "RUNNING"]
    child = pexpect.spawn(
        "runuser", ["-u", ALICE, "--", "env", f"SLURM_CONF={C.SLURM_CONF}", "TERM=xterm",
                    "PS1=tb$ ", "srun", "--overlap", "--pty", f"--jobid={alice_job}",
                    "bash", "--norc", "--noprofile", "-i"],
        cwd=home(ALICE), dimensions=(37, 123), encoding="utf-8", timeout=20)
    try:
        child.expect_exact("tb$ ")
        child.sendline('echo "who=$(id -un) size=$(stty size) job=$SLURM_JOB_ID"')
        child.expect(r"who=(\S+) size=(\d+ \d+) job=(\d+)")
        assert child.match.groups() == (ALICE, "37 123", alice_job)
        child.expect_exact("tb$ ")
        child.sendline("exit 7")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 7, child.before


def test_other_user_cannot_srun_into_job(alice_job):
    p = run_as(BOB, "srun", "--overlap", f"--jobid={alice_job}", "true")
    assert p.returncode != 0
    assert "Access/permission denied" in p.stderr


def test_scancel_ends_job(alice_job):
    p = run_as(ALICE, "scancel", alice_job)
    assert p.returncode == 0, p.stderr
    wait_for(lambda: states(alice_job).get(alice_job, "gone") not in ("RUNNING", "COMPLETING"),
             20, f"job {alice_job} to end")


def test_twenty_one_cpu_jobs_run_at_once():
    name = f"tb-many-{uuid.uuid4().hex[:6]}"
    jobs = [submit(BOB, "-J", name, "-n1", "-c1", "-t", "5", "--wrap", "sleep 300")
            for _ in range(20)]
    try:
        wait_for(lambda: list(states(*jobs).values()).count("RUNNING") == 20, 30,
                 "20 jobs RUNNING at the same time")
    finally:
        scancel(*jobs)


def sshd_log_after(offset: int) -> str:
    with open(C.SSHD_LOG, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").replace("\r", "")


def test_ssh_admin_gets_a_plain_shell():
    p = subprocess.run(C.ssh_command(C.ADMIN, 'id -un; sinfo -h -o %P; exit 3'),
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode == 3, p.stderr
    assert p.stdout.split() == [C.ADMIN, f"{C.PARTITION}*", *C.NODES]


def test_ssh_user_hits_forcecommand():
    """sbalice is forced into `sbroker login`. What that then does (error without a broker,
    a session with one) is not this test's business, so ssh is stopped once sshd logged it."""
    offset = C.SSHD_LOG.stat().st_size
    ssh = subprocess.Popen(C.ssh_command(ALICE, "echo", "hello"), stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    expected = f"Starting session: forced-command (config) '{C.FORCE_COMMAND}' for {ALICE}"
    try:
        wait_for(lambda: expected in sshd_log_after(offset), 20,
                 f"sshd.log to show {expected!r}")
    finally:
        if ssh.poll() is None:
            ssh.terminate()
        ssh.communicate(timeout=10)


def test_harness_up_is_idempotent():
    before = {d.name: d.pid() for d in harness.DAEMONS} | {n.name: n.slurmd_pid() for n in harness.NODES}
    p = subprocess.run([sys.executable, "-m", "tests.cluster", "up", "--no-reinstall"],
                       cwd=C.REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert {d.name: d.pid() for d in harness.DAEMONS} | {n.name: n.slurmd_pid() for n in harness.NODES} == before
    s = subprocess.run([sys.executable, "-m", "tests.cluster", "status"], cwd=C.REPO,
                       capture_output=True, text=True, timeout=60)
    assert s.returncode == 0, s.stdout + s.stderr
    for name in ("slurmctld", "sshd"):
        assert re.search(rf"^{name}\s+running, pid {before[name]}$", s.stdout, re.M), s.stdout
    for node in C.NODES:
        assert re.search(rf"^{node}\s+up, init pid \d+, slurmd pid \d+$", s.stdout, re.M), s.stdout
    # One sinfo line per node state: a node still completing a job a moment ago is a line of its own.
    rows = re.findall(rf"^(?:sinfo\s+)?{C.PARTITION}\* up infinite (\d+) [a-z]+ (\S+)", s.stdout, re.M)
    assert sum(int(count) for count, _ in rows) == len(C.NODES), s.stdout
