"""Admin plane on the real cluster: ls as admin/user, kill, audit with peer uid, metrics, bad input."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from broker.agents import MAX_AGE as AGENT_STATUS_MAX_AGE
from tests.cluster import config as tb
from tests.integration.conftest import ALICE, BOB, ensure_as, jobs_of, sbroker, sbroker_json, wait_node

from .conftest import attach, audit_entries, instances_of, metric_samples, scrape, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_sessions(start_broker):
    start_broker()
    before = metric_samples()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        alice, bob = pool.map(lambda a: ensure_as(*a), [(ALICE, "alpha"), (BOB, "beta")])
    assert alice["type"] == "result" and bob["type"] == "result", (alice, bob)
    for user, reply in ((ALICE, alice), (BOB, bob)):  # node: the poller's next squeue after ready
        assert wait_node(user, reply["session"]["id"]) in tb.NODES
    return {"alice": alice["session"], "bob": bob["session"], "metrics_before": before}


def test_ls_admin_sees_both_with_fields_users_only_their_own(two_sessions):
    alice, bob = two_sessions["alice"], two_sessions["bob"]
    listed = {s["id"]: s for s in sbroker_json(tb.ADMIN, "ls")}
    assert set(listed) == {alice["id"], bob["id"]}
    for mine, user, project in ((alice, ALICE, "alpha"), (bob, BOB, "beta")):
        s = listed[mine["id"]]
        assert (s["user"], s["project"], s["state"]) == (user, project, "ready")
        job = jobs_of(user)
        assert [j["job_id"] for j in job] == [s["job_id"]] and job[0]["state"] == "RUNNING"
        assert s["node"] in tb.NODES
        assert s["instance"].startswith(f"sb-{user}-{project}-") and s["instance"] in instances_of(user)
        assert s["image"].endswith(".sif") and s["image_digest"].startswith("sha256:")
        assert s["time_left"] and s["idle"] >= 0 and s["age"] > 0
        assert s["image_version"] and s["idle_warned"] is False
        # Terminals are the session agent's (issue 15): its status file, beside the job log,
        # is what ls reports; nobody has logged in yet. Walltime warnings are the agent's too,
        # so the broker no longer lists which it sent.
        status = agent_status(s["id"])
        assert (status["v"], status["shells"], status["writers"], status["observers"]) == (1, 0, 0, 0)
        assert (s["attachers"], s["shells"], s["detached_shells"]) == (0, 0, 0)
        assert "walltime_warned" not in s
    assert [s["id"] for s in sbroker_json(ALICE, "ls")] == [alice["id"]]
    assert [s["id"] for s in sbroker_json(BOB, "ls")] == [bob["id"]]
    table = sbroker(tb.ADMIN, "ls").stdout.splitlines()
    assert all(len(line) <= 80 for line in table), table
    assert table[0].split()[:3] == ["USER", "PROJECT", "STATE"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows[ALICE][3] == alice["job_id"]
    assert rows[ALICE][5] == "defau~"  # PROF, six columns wide: the profile "default", cut with a ~
    assert rows[BOB][6].endswith("@" + bob["image_digest"].split(":")[1][:6])


def test_metrics_move_when_sessions_start_attach_and_fail(two_sessions):
    before = two_sessions["metrics_before"]
    now = metric_samples()
    cold = ("sbroker_time_to_shell_seconds_count", (("path", "cold"),))
    warm = ("sbroker_time_to_shell_seconds_count", (("path", "warm"),))
    assert now[cold] - before[cold] == 2
    assert now[("sbroker_sessions", (("state", "ready"),))] == 2
    sbatch = ("sbroker_scheduler_calls_total", (("command", "sbatch"),))
    assert now[sbatch] - before.get(sbatch, 0) == 2
    assert now[("sbroker_poll_cycle_seconds_count", ())] > 0
    assert now[("sbroker_submit_to_ready_seconds_count", ())] == 2
    # warm: the session is already ready
    assert ensure_as(ALICE, "alpha")["session"]["id"] == two_sessions["alice"]["id"]
    assert metric_samples()[warm] - before[warm] == 1
    # attach: the broker hands out the srun to the session's agent (counted at once); the
    # agent holds the terminal and says so in its status file, which the broker reads at most
    # every AGENT_STATUS_MAX_AGE seconds (its policy tick, ls, show), so the gauge follows.
    sid = two_sessions["alice"]["id"]
    attaches = ("sbroker_attaches_total", ())
    attached = ("sbroker_attached_sessions", ())
    child = attach(ALICE, sid)
    try:
        assert metric_samples()[attaches] - now[attaches] == 1
        wait_for(lambda: agent_status(sid)["writers"] == 1, 5,
                 "the agent's status file to show the writer (written 0.1 s after an attach)")
        wait_for(lambda: metric_samples()[attached] == 1, AGENT_STATUS_MAX_AGE + 5,
                 "sbroker_attached_sessions to count alice's session (status read at most every "
                 f"{AGENT_STATUS_MAX_AGE:g} s)")
        shown = sbroker_json(tb.ADMIN, "show", sid)
        assert (shown["attachers"], shown["shells"], shown["detached_shells"]) == (1, 1, 0)
        attaches_audited = [e for e in audit_entries() if e["event"] == "attach" and e.get("session") == sid]
        assert [(e["by"], e["peer_uid"], e["mode"], e["job_id"]) for e in attaches_audited] == [
            (ALICE, pwd.getpwnam(ALICE).pw_uid, "write", two_sessions["alice"]["job_id"])]
    finally:
        child.sendline("exit")
        child.expect(pexpect_eof())
    # The shell exited (not detached): the agent has no shell left and the gauge drops back.
    wait_for(lambda: agent_status(sid)["shells"] == 0, 5, "the agent's status file to drop the exited shell")
    wait_for(lambda: metric_samples()[attached] == 0, AGENT_STATUS_MAX_AGE + 5,
             "sbroker_attached_sessions to drop alice's session after her shell exited")
    # fail: bob's project dir cannot be created (a file is in the way) -> submission fails
    blocker = f"/home/{BOB}/proj/broken"
    subprocess.run(tb.as_user(BOB, "sh", "-c", f"mkdir -p /home/{BOB}/proj && : > {blocker}"), check=True, cwd="/")
    try:
        reply = ensure_as(BOB, "broken")
    finally:
        os.unlink(blocker)
    assert reply["type"] == "error", reply
    failed = metric_samples()
    key = ("sbroker_session_failures_total", (("reason", "submission failed"),))
    assert failed[key] - before.get(key, 0) == 1
    assert failed[("sbroker_sessions", (("state", "failed"),))] >= 1


def agent_status(session_id: str) -> dict:
    """The session agent's own status file (``{instance}.agent.json`` beside the job log), read
    directly: what the agent says, not what the broker cached of it."""
    shown = sbroker_json(tb.ADMIN, "show", session_id)
    path = Path(shown["log_path"]).with_name(f"{shown['instance']}.agent.json")
    return json.loads(path.read_text())


def pexpect_eof():
    import pexpect

    return pexpect.EOF


def test_kill_ends_job_and_instance_and_is_audited_with_peer_uid(two_sessions):
    alice = two_sessions["alice"]
    result = sbroker(tb.ADMIN, "kill", alice["id"], "--reason", "maintenance window")
    # The reply comes once scancel returned; only a later squeue poll makes the session ended.
    assert result.stdout == f"{ALICE}/alpha (job {alice['job_id']}): ending\n"
    wait_for(lambda: not jobs_of(ALICE), 30, "alice's job to leave squeue")
    wait_for(lambda: alice["instance"] not in instances_of(ALICE), 30, "alice's instance to stop")
    kills = [e for e in audit_entries() if e["event"] == "kill" and e.get("session") == alice["id"]]
    assert len(kills) == 1
    assert kills[0]["by"] == tb.ADMIN and kills[0]["peer_uid"] == pwd.getpwnam(tb.ADMIN).pw_uid
    assert kills[0]["reason"] == "maintenance window" and kills[0]["job_id"] == alice["job_id"]
    ended = wait_for(lambda: [e for e in audit_entries() if e["event"] == "session_ended"
                              and e.get("session") == alice["id"]], 20, "session_ended in the audit log")
    assert "maintenance window" in ended[0]["reason"]
    # The same events through the CLI, as the admin (alice sees her own; bob none of hers).
    events = [json.loads(line) for line in sbroker(tb.ADMIN, "events", "--since", "10m",
                                                   "--json").stdout.splitlines()]
    assert any(e["event"] == "kill" and e.get("session") == alice["id"] for e in events)
    bob_events = sbroker(BOB, "events", "--json").stdout
    assert alice["id"] not in bob_events
    # bob's session is untouched
    assert [j["job_id"] for j in jobs_of(BOB)] == [two_sessions["bob"]["job_id"]]


def test_bad_input_is_refused_clearly_and_daemon_unaffected(two_sessions):
    bob = two_sessions["bob"]
    unknown = sbroker(ALICE, "kill", "no-such-session", check=False)
    assert unknown.returncode != 0 and "no session 'no-such-session'" in unknown.stderr
    theirs = sbroker(ALICE, "kill", bob["id"], check=False)
    assert theirs.returncode != 0 and "no session" in theirs.stderr
    assert [j["job_id"] for j in jobs_of(BOB)] == [bob["job_id"]]  # still running
    since = sbroker(tb.ADMIN, "events", "--since", "last tuesday", check=False)
    assert since.returncode == 2 and "--since" in since.stderr and "last tuesday" in since.stderr
    reap = sbroker(ALICE, "reap", check=False)
    assert reap.returncode != 0 and "only members of" in reap.stderr
    for garbage in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",
                    b"GET /metrics\r\n\r\n", b"DELETE /metrics HTTP/1.1\r\n\r\n"):
        status, _ = scrape(request=garbage)
        assert status.split()[1] in (b"400", b"405"), status
    assert metric_samples()[("sbroker_bad_scrapes_total", ())] >= 3
    # The daemon is unaffected: it still answers and bob's session is still ready.
    assert sbroker_json(BOB, "show", bob["id"])["state"] == "ready"
