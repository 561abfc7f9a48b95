"""Issue 14 item 1: a user's job name and comment cannot forge the scheduler's word.

bob can set his own job's name and comment to anything (``scontrol update``), and squeue
prints them unchanged: ``|``, U+2028 and every other line boundary ``str.splitlines()``
splits on. These tests run the real ``squeue`` and the real daemon:

* a property test feeds hostile names and comments through the broker's own poll query and
  parser and checks alice's job reads exactly as SLURM has it, with no job added or lost;
* the attack as reported: a forged "COMPLETED" line for alice's job in bob's comment; the
  daemon polls several times and alice's session stays ready;
* bob tags his own job ``user=<alice>``: after a broker restart, adoption never hands
  alice's project to bob's job (the owner is SLURM's numeric uid, not the comment).
"""

from __future__ import annotations

import secrets
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.slurm import commands
from broker.slurm.parse import parse_poll, parse_squeue_json
from tests.cluster import config as tb
from tests.integration.conftest import ensure_as, jobs_of
from tests.integration.daemon import LOG_PATH, BrokerProcess, reset_state
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

ALICE, BOB = tb.USERS
#: Every code point Python's str.splitlines() splits on, and squeue's own separator.
LINE_BOUNDARIES = ["\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def as_user(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(tb.as_user(user, *argv), capture_output=True, text=True, timeout=30, cwd="/")


def submit(user: str, name: str) -> str:
    res = as_user(user, "sbatch", "--parsable", "-J", name, "-t", "30", "-o", "/dev/null",
                  f"--chdir=/home/{user}", "--wrap", "sleep 1800")
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def squeue_poll(job_ids: set[str]) -> dict:
    token = secrets.token_hex(8)
    res = subprocess.run(commands.squeue_jobs(job_ids, token), capture_output=True, text=True,
                         env=tb.slurm_env(), timeout=30)
    assert res.returncode == 0, res.stderr
    return parse_poll(res.stdout, token, job_ids)


def forged_line(job_id: str) -> str:
    """What the old parser would have taken for alice's job: her id, COMPLETED."""
    return f"{job_id}|COMPLETED|None|node1|2026-01-01T00:00:00|0:00|{ALICE}|x|sbroker/v1 user={ALICE}"


@pytest.fixture(scope="module")
def two_jobs(cluster):
    reset_state()
    alice, bob = submit(ALICE, "sb-victim"), submit(BOB, "sb-probe")
    wait_for(lambda: {j["state"] for u in (ALICE, BOB) for j in jobs_of(u)} == {"RUNNING"}, 30,
             "both jobs running")
    yield alice, bob
    for user in (ALICE, BOB):
        as_user(user, "scancel", "-u", user)
    reset_state()


hostile_text = st.lists(
    st.one_of(st.sampled_from(LINE_BOUNDARIES + ["|", "%", "\t", "\x1b[2J", "\x7f", "\\"]),
              st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)),
    max_size=12).map("".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(comment=hostile_text, name=hostile_text, long=st.booleans())
def test_no_name_or_comment_changes_what_the_poll_reads_of_another_job(two_jobs, comment, name, long):
    alice, bob = two_jobs
    body = comment + "".join(b + forged_line(alice) for b in LINE_BOUNDARIES)
    if long:
        body += "|" * 3000
    name = (name + "\u2028" + forged_line(alice))[:200] or "x"
    res = as_user(BOB, "scontrol", "update", f"JobId={bob}", f"Comment={body}", f"Name={name}")
    if res.returncode != 0:  # SLURM refused the value itself (e.g. too long): nothing to read
        return
    jobs = squeue_poll({alice, bob})
    assert set(jobs) == {alice, bob}
    assert jobs[alice].state == "RUNNING" and jobs[alice].user == ALICE
    assert jobs[bob].state == "RUNNING" and jobs[bob].user == BOB
    assert jobs[alice].uid != jobs[bob].uid
    # The JSON scan (adoption, reaper) keeps bob's text whole, inside bob's record.
    scan = parse_squeue_json(subprocess.run(commands.squeue_all(), capture_output=True, text=True,
                                            env=tb.slurm_env(), timeout=30).stdout)
    assert scan[alice].state == "RUNNING" and scan[alice].comment == ""
    assert scan[bob].uid == jobs[bob].uid


def broker_polls_since(offset: int) -> int:
    with open(LOG_PATH, "rb") as fh:
        fh.seek(offset)
        return fh.read().count(b'"argv": ["squeue", "--noheader"]')


def test_a_forged_completed_line_leaves_the_victims_session_ready(cluster):
    reset_state()
    proc = BrokerProcess(slurm_poll_interval=0.5)
    proc.start()
    try:
        session = ensure_as(ALICE, "victim")["session"]
        bob = submit(BOB, "sb-attacker")
        forged = "".join(b + forged_line(session["job_id"]) for b in LINE_BOUNDARIES)
        res = as_user(BOB, "scontrol", "update", f"JobId={bob}", f"Comment=x{forged}")
        assert res.returncode == 0, res.stderr
        offset = LOG_PATH.stat().st_size
        # Several polls of alice's job happen after the forgery (a positive event) ...
        wait_for(lambda: broker_polls_since(offset) >= 4, 30, "four polls after the forgery")
        # ... and she still has her session, with the same job, in SLURM and in the broker.
        again = ensure_as(ALICE, "victim")["session"]
        assert again["id"] == session["id"] and again["state"] == "ready"
        assert [j["job_id"] for j in jobs_of(ALICE)] == [session["job_id"]]
    finally:
        proc.stop()
        as_user(BOB, "scancel", "-u", BOB)
        reset_state()


def test_a_job_tagged_for_another_user_is_never_adopted_for_them(cluster):
    reset_state()
    bob = submit(BOB, "sb-impostor")
    tag = f"sbroker/v1 user={ALICE} project=stolen instance=sb-{ALICE}-stolen-abcdef digest=0"
    # The tag alone, and a forged record of bob's own job claiming alice as its user.
    forged = f"{bob}|RUNNING|None|node1|2026-01-01T00:00:00|1:00|{ALICE}|sb-x|{tag}"
    comment = tag + "".join(b + forged for b in ("\u2028", "\n", "\x1e"))  # SLURM caps a comment's length
    assert as_user(BOB, "scontrol", "update", f"JobId={bob}", f"Comment={comment}").returncode == 0
    wait_for(lambda: [j["state"] for j in jobs_of(BOB)] == ["RUNNING"], 30, "bob's job running")
    proc = BrokerProcess()
    proc.start()   # start-up adoption scans every tagged job
    try:
        session = ensure_as(ALICE, "stolen")["session"]
        assert session["job_id"] != bob and session["state"] == "ready"
        assert [j["job_id"] for j in jobs_of(BOB)] == [bob]  # and bob's job was not cancelled either
    finally:
        proc.stop()
        as_user(BOB, "scancel", "-u", BOB)
        reset_state()
