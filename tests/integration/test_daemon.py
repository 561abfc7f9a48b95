"""The broker daemon on the real cluster: exactly-once creation, readiness, failure, restart."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pwd
import subprocess

import pytest

from broker.client import BrokerError, Client
from tests.cluster import config as tb
from tests.cluster import harness
from tests.waiting import wait_for

from .conftest import ALICE, BOB, ensure_as, jobs_of, sbroker, sbroker_json, tagged_jobs, wait_node
from .daemon import LOG_PATH, SOCKET, STATE_DIR

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def slurm_calls_since(offset: int) -> list[dict]:
    """The daemon's own record of every SLURM command it ran (debug log), after ``offset``."""
    with open(LOG_PATH) as fh:
        fh.seek(offset)
        return [json.loads(line) for line in fh if '"slurm_call"' in line]


def test_ensure_creates_one_job_and_reuses_it(broker):
    before = tagged_jobs(ALICE)
    first_mark = LOG_PATH.stat().st_size
    first = ensure_as(ALICE, "alpha")
    assert first["type"] == "result", first
    session = first["session"]
    assert session["state"] == "ready"
    assert session["job_id"].isdigit()
    # The node comes from the poller's next squeue (woken by readiness), not from an extra
    # SLURM call while the user waits for a prompt.
    node = wait_node(ALICE, session["id"])
    assert node in tb.NODES
    assert session["instance"].startswith(f"sb-{ALICE}-alpha-")
    jobs = jobs_of(ALICE)
    assert [j["job_id"] for j in jobs] == [session["job_id"]]
    assert f"instance={session['instance']}" in jobs[0]["comment"]
    # The instance really runs on that node, as alice, under the exact name the broker chose.
    listed = subprocess.run(harness.on_node(node, f"{tb.BIN}/apptainer", "instance", "list", "--json", user=ALICE),
                            capture_output=True, text=True, check=True, cwd="/").stdout
    assert f'"instance": "{session["instance"]}"' in listed
    first_calls = slurm_calls_since(first_mark)
    assert [c["user"] for c in first_calls if c["argv"][0] == "sbatch"] == [ALICE]
    log_mark = LOG_PATH.stat().st_size
    second = ensure_as(ALICE, "alpha")
    # The second ensure itself runs nothing: only the poller's one batched squeue may appear.
    calls = slurm_calls_since(log_mark)
    assert all(c["argv"] == ["squeue", "--noheader"] for c in calls), calls
    assert second["session"]["id"] == session["id"]
    assert second["session"]["job_id"] == session["job_id"]
    assert tagged_jobs(ALICE) - before == {session["job_id"]}


def test_project_dir_is_created_by_the_user_only_when_missing(broker):
    home = f"/home/{ALICE}/proj"
    subprocess.run(["rm", "-rf", f"{home}/fresh", f"{home}/kept"], check=True)
    subprocess.run(tb.as_user(ALICE, "mkdir", "-p", f"{home}/kept"), check=True, cwd="/")
    mark = LOG_PATH.stat().st_size
    sessions = [ensure_as(ALICE, project)["session"] for project in ("fresh", "kept")]
    for session in sessions:
        assert session["state"] == "ready"
        sbroker(ALICE, "kill", session["id"])  # the other tests here expect alice to have no others
    mkdirs = [c for c in slurm_calls_since(mark) if c["argv"][0] == "mkdir"]
    assert [c["user"] for c in mkdirs] == [ALICE], mkdirs  # the missing one, as alice; not the existing one
    st = os.stat(f"{home}/fresh")
    assert st.st_uid == pwd.getpwnam(ALICE).pw_uid
    ids = {s["id"] for s in sessions}  # ending until SLURM says their jobs are gone
    wait_for(lambda: not ids & {s["id"] for s in sbroker_json(ALICE, "ls")}, 30, "the killed sessions to end")


def test_concurrent_first_logins_make_exactly_one_job(broker):
    project = "burst"
    before = tagged_jobs(BOB)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: ensure_as(BOB, project), range(20)))
    ids = {r["session"]["id"] for r in results}
    jobs = {r["session"]["job_id"] for r in results}
    assert len(ids) == 1 and len(jobs) == 1, results
    assert tagged_jobs(BOB) - before == jobs


def test_bad_project_is_refused_with_the_rule(broker):
    reply = ensure_as(ALICE, "Bad;rm -rf")
    assert reply["type"] == "error"
    assert reply["message"].startswith("project:")
    assert "must match" in reply["message"]


def test_user_cannot_see_or_kill_another_users_session_admin_can(broker):
    alice = ensure_as(ALICE, "alpha")["session"]
    assert [s["id"] for s in sbroker_json(ALICE, "ls")] == [alice["id"]]
    bob_view = sbroker_json(BOB, "ls")
    assert alice["id"] not in [s["id"] for s in bob_view]
    for args in (("show", alice["id"]), ("kill", alice["id"]), ("logs", alice["id"]),
                 ("show", f"{ALICE}/alpha")):
        result = sbroker(BOB, *args, check=False)
        assert result.returncode != 0
        assert "no session" in result.stderr
    # The refusal is the same as for a session that does not exist at all.
    ghost = sbroker(BOB, "show", "does-not-exist", check=False)
    assert ghost.stderr.replace("does-not-exist", "X") == sbroker(
        BOB, "show", alice["id"], check=False).stderr.replace(alice["id"], "X")
    admin_view = sbroker_json(tb.ADMIN, "ls")
    assert alice["id"] in [s["id"] for s in admin_view]
    shown = sbroker_json(tb.ADMIN, "show", alice["id"])
    assert shown["job_id"] == alice["job_id"]
    assert "INSTANCE_READY" in shown["log_tail"]


def test_state_dir_is_root_only_and_logs_not_writable_by_others(broker):
    session = ensure_as(ALICE, "alpha")["session"]
    st = os.stat(STATE_DIR)
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o711
    db = os.stat(STATE_DIR / "sessions.db")
    assert db.st_mode & 0o077 == 0
    shown = sbroker_json(tb.ADMIN, "show", session["id"])
    # The job's output is in the user's own job dir (shared storage), which only she can enter.
    jobs = os.stat(os.path.dirname(shown["log_path"]))
    assert jobs.st_uid == pwd.getpwnam(ALICE).pw_uid and jobs.st_mode & 0o077 == 0
    script = os.stat(shown["script_path"])
    assert script.st_uid == 0 and script.st_mode & 0o077 == 0
    bob_read = subprocess.run(["runuser", "-u", BOB, "--", "cat", shown["log_path"]], capture_output=True)
    assert bob_read.returncode != 0
    bob_list = subprocess.run(["runuser", "-u", BOB, "--", "ls", str(STATE_DIR / "jobs" / ALICE)],
                              capture_output=True)
    assert bob_list.returncode != 0


def test_malformed_frames_get_one_error_and_daemon_keeps_serving(broker):
    import socket
    import struct

    cases = [b"J" + struct.pack(">I", 5) + b"nope!", b"X" + struct.pack(">I", 1) + b"x",
             b"J" + struct.pack(">I", 10**9), b"J" + struct.pack(">I", 2) + b"[]"]
    for raw in cases:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(SOCKET))
            sock.sendall(raw)
            reply = sock.recv(65536)
            assert b'"type":"error"' in reply and b"frame" in reply
    with Client(str(SOCKET)) as c:
        with pytest.raises(BrokerError) as err:
            c.request("no-such-op")
        assert err.value.field == "op"
    with Client(str(SOCKET)) as c:
        assert c.request("ping")["type"] == "result"
