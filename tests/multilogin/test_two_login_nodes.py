"""Several login nodes, two brokers, one truth (issue "Several login nodes").

login1 (the machine) and login2 (the bed's second login node: own hostname, own mount
namespace, so its broker's state dir and socket really differ, own sshd) each run a broker.
They share only what login nodes share: homes, SLURM, the users. They converge through
SLURM itself (a deterministic job name with ``--dependency=singleton``, and the oldest live
tagged job of the key wins on every node), never through a shared lock file.
"""

from __future__ import annotations

import json
import subprocess
import threading

import pexpect
import pytest

from broker.agents import MAX_AGE as AGENT_STATUS_MAX_AGE
from tests.cluster import config as tb
from tests.integration.conftest import ensure_as, jobs_of, sbroker, sbroker_json
from tests.integration.daemon import LOG_PATH, BrokerProcess
from tests.waiting import wait_for

from .daemons import LOG2, Login2Broker, running_both, sbatch_calls, sbroker2

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ALICE, BOB = tb.USERS
LOGINS = 50


def ssh(user: str, *remote: str, port: int = tb.SSH_PORT, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(tb.ssh_command(user, *remote, port=port), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def slurm_jobs(user: str, project: str) -> list[dict]:
    """Every job SLURM has for the key (``squeue --json``), in any state, oldest first."""
    out = subprocess.run(["squeue", "--json"], capture_output=True, text=True, env=tb.slurm_env(),
                         check=True).stdout
    return sorted((j for j in json.loads(out)["jobs"] if j["user_name"] == user
                   and j["name"] == f"sbroker-session-{project}"), key=lambda j: j["job_id"])


def concurrent_logins(project: str, n: int) -> list[subprocess.CompletedProcess[str] | BaseException]:
    """``n`` simultaneous ``ssh @project 'echo J=$SLURM_JOB_ID'``, alternating login nodes."""
    results: list[subprocess.CompletedProcess[str] | BaseException] = [None] * n  # type: ignore[list-item]

    def login(i: int) -> None:
        port = tb.SSH_PORT if i % 2 == 0 else tb.LOGIN2_SSH_PORT
        try:
            results[i] = ssh(ALICE, f"@{project}", "echo J=$SLURM_JOB_ID", port=port)
        except BaseException as exc:  # a timeout is a result to report, not a thread crash
            results[i] = exc
    threads = [threading.Thread(target=login, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def one_job_for_all(results: list[subprocess.CompletedProcess[str] | BaseException]) -> str:
    """Every login succeeded and ran in the same job: its id."""
    failed = [(i, r) for i, r in enumerate(results)
              if not isinstance(r, subprocess.CompletedProcess) or r.returncode != 0]
    assert not failed, failed[:3]
    seen = {r.stdout.strip() for r in results}
    assert len(seen) == 1, seen
    return seen.pop().removeprefix("J=")


@pytest.fixture
def two_brokers(cluster):
    with running_both(BrokerProcess(timeouts_idle=4, timeouts_idle_grace=2), Login2Broker()) as both:
        yield both


def test_a_session_made_through_login1_is_listed_attached_and_killed_through_login2(two_brokers):
    made = ensure_as(ALICE, "shared")["session"]
    listed = json.loads(sbroker2(tb.ADMIN, "ls", "--json").stdout)
    assert [(s["user"], s["project"], s["job_id"]) for s in listed] == [(ALICE, "shared", made["job_id"])]
    assert sbroker2(ALICE, "show", "shared", "--json").stdout and \
        json.loads(sbroker2(ALICE, "show", "shared", "--json").stdout)["job_id"] == made["job_id"]
    res = ssh(ALICE, "@shared", "echo J=$SLURM_JOB_ID", port=tb.LOGIN2_SSH_PORT)
    assert res.returncode == 0 and res.stdout.split() == [f"J={made['job_id']}"], res.stderr
    shell = pexpect.spawn("ssh", ["-tt", "-o", "SendEnv=SBROKER_PROJECT", *tb.ssh_command(ALICE, port=tb.LOGIN2_SSH_PORT)[1:]],
                          env={"PATH": "/usr/bin:/bin", "TERM": "xterm", "SBROKER_PROJECT": "shared"},
                          timeout=60, dimensions=(24, 100))
    try:
        shell.expect(rb"\$ ")
        shell.sendline("echo at-$SLURM_JOB_ID-$((6*7))")
        shell.expect(f"at-{made['job_id']}-42")
    finally:
        shell.close(force=True)
    sbroker2(tb.ADMIN, "kill", f"{ALICE}/shared")
    wait_for(lambda: not jobs_of(ALICE), 30, "the job ended in SLURM")
    wait_for(lambda: sbroker_json(tb.ADMIN, "show", made["id"])["state"] == "ended", 30,
             "login1 sees the session ended")


def test_fifty_first_logins_over_both_login_nodes_make_one_allocation(two_brokers):
    offsets = (LOG_PATH.stat().st_size, LOG2.stat().st_size)
    earlier = {j["job_id"] for j in slurm_jobs(ALICE, "storm")}   # other runs' jobs, still listed
    job = one_job_for_all(concurrent_logins("storm", LOGINS))
    jobs = [j for j in slurm_jobs(ALICE, "storm") if j["job_id"] not in earlier]
    ran = [j for j in jobs if j["nodes"]]   # a job that never ran was never given a node
    assert [str(j["job_id"]) for j in ran] == [job], jobs   # one allocation ever ran, the one every login used
    assert [j["job_state"] for j in jobs if str(j["job_id"]) == job] == ["RUNNING"]  # never cancelled
    per_broker = (sbatch_calls(LOG_PATH, offsets[0]), sbatch_calls(LOG2, offsets[1]))
    assert all(n <= 1 for n in per_broker), per_broker
    print(f"50 logins over 2 login nodes: sbatch per broker {per_broker}, jobs {[j['job_id'] for j in jobs]}")


def test_login1s_reaper_and_idle_policy_leave_login2s_live_session_alone(two_brokers):
    """login1 culls after 4 s idle (+2 s grace); alice works through login2 only.

    Since issue 15 the shell lives in the session's agent, in the allocation: login1 learns
    that alice is attached from the agent's status file in the shared job dir (as it would
    for a login through itself), not from a terminal it carries. An idle session of bob's,
    started through login1 after it adopted alice's, is the control: once login1 has warned
    and ended it, its policy has looked at alice's session past idle + grace as well.
    """
    shell = pexpect.spawn("ssh", ["-tt", "-o", "SendEnv=SBROKER_PROJECT", *tb.ssh_command(ALICE, port=tb.LOGIN2_SSH_PORT)[1:]],
                          env={"PATH": "/usr/bin:/bin", "TERM": "xterm", "SBROKER_PROJECT": "remote"},
                          timeout=60, dimensions=(24, 100))
    try:
        shell.expect(rb"\$ ")
        session = json.loads(sbroker2(ALICE, "show", "remote", "--json").stdout)
        job = session["job_id"]

        def remote_on_login1() -> list[dict]:
            return [s for s in json.loads(sbroker(tb.ADMIN, "ls", "--json").stdout) if s["project"] == "remote"]

        assert [s["job_id"] for s in remote_on_login1()] == [job]   # login1 adopts it
        seen = wait_for(lambda: [s for s in remote_on_login1() if s["attachers"] == 1], AGENT_STATUS_MAX_AGE + 5,
                        "login1 to read alice's attached terminal from her agent's status file")
        assert seen[0]["shells"] == 1 and seen[0]["idle_warned"] is False
        # The control: bob's session through login1, nobody attached, is warned and ended.
        control = ensure_as(BOB, "control")["session"]
        wait_for(lambda: events_of(control["id"], "kill"), 60, "login1 to end bob's idle control session")
        assert events_of(control["id"], "idle_warning")
        for kind in ("idle_warning", "kill"):
            assert not events_of(session["id"], kind), kind
        report = json.loads(sbroker(tb.ADMIN, "reap", "--json").stdout)
        assert job not in [j["job_id"] for j in report["orphan_jobs"]]
        assert [j["job_id"] for j in jobs_of(ALICE)] == [job]
        assert [s["state"] for s in remote_on_login1()] == ["ready"]
        shell.sendline("echo still-$((6*7))")
        shell.expect("still-42")
    finally:
        shell.close(force=True)


def events_of(session_id: str, kind: str) -> list[dict]:
    """login1's audit events of ``kind`` for the session, as its administrator reads them."""
    lines = sbroker(tb.ADMIN, "events", "--since", "1h", "--json").stdout.splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind and e.get("session") == session_id]


@pytest.fixture
def two_immediate_brokers(cluster):
    with running_both(BrokerProcess(slurm_launch="immediate"), Login2Broker(slurm_launch="immediate")) as both:
        yield both


def test_immediate_logins_over_both_login_nodes_converge_on_the_older_allocation(two_immediate_brokers):
    """No singleton in the immediate mode: each broker may allocate once for the key at the same
    moment; the newer allocation is cancelled before its session is ready, and every login ends
    up in the older one."""
    earlier = {j["job_id"] for j in slurm_jobs(ALICE, "rush")}
    job = one_job_for_all(concurrent_logins("rush", 20))
    jobs = [j for j in slurm_jobs(ALICE, "rush") if j["job_id"] not in earlier]
    assert 1 <= len(jobs) <= 2, jobs  # one allocation per broker at most
    assert min(str(j["job_id"]) for j in jobs) == job  # the older one is every login's
    wait_for(lambda: [j["job_state"] for j in slurm_jobs(ALICE, "rush") if j["job_id"] not in earlier
                      and j["job_state"] not in ("CANCELLED", "COMPLETED")] == ["RUNNING"], 30,
             "only the older allocation to remain")
