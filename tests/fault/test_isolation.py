"""Isolation between users, beyond tests/integration (which covers show/kill/logs by id).

Every way of naming another user's session (id, ``user/project``, bare project, the
stored id of an ended one) through every operation (attach, observe, show, kill, logs,
events, list) gets the same answer as a session that does not exist. Identity comes
from ``SO_PEERCRED`` only: ``user``/``uid``/``admin`` fields in a request change nothing.
Start scripts and logs are not writable by other users; the state dir is root-only.
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from tests.cluster import config as tb
from tests.integration.conftest import ensure_as

from .conftest import ALICE, BOB, STATE_DIR, BrokerProcess, request_as, reset_state

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def two(cluster):
    reset_state()
    proc = BrokerProcess()
    proc.start()
    alice = ensure_as(ALICE, "secret")["session"]
    bob = ensure_as(BOB, "other")["session"]
    # an ended session of alice's, reachable only through the store
    gone = ensure_as(ALICE, "gone")["session"]
    assert request_as(tb.ADMIN, {"v": 1, "op": "kill", "session": gone["id"]})[-1]["type"] == "result"
    yield proc, alice, bob, gone
    proc.stop()
    reset_state()


def last(user: str, message: dict) -> dict:
    return request_as(user, {"v": 1, **message})[-1]


def same_as_ghost(peer_user: str, op: str, ref: str, extra: dict | None = None) -> dict:
    extra = extra or {}
    reply = last(peer_user, {"op": op, "session": ref, **extra})
    ghost = last(peer_user, {"op": op, "session": "nonexistent-ref", **extra})
    assert reply["type"] == "error", (op, ref, reply)
    assert reply == {**ghost, "message": ghost["message"].replace("nonexistent-ref", ref)}, (reply, ghost)
    return reply


def test_other_users_sessions_are_indistinguishable_from_missing_ones(two):
    _, alice, _, gone = two
    refs = [alice["id"], f"{ALICE}/secret", f"{ALICE}/gone", gone["id"], f"{ALICE}/nonexistent"]
    for ref in refs:
        for op, extra in (("show", {}), ("kill", {}), ("logs", {}), ("logs", {"offset": 0}),
                          ("attach", {"rows": 24, "cols": 80}), ("attach", {"mode": "observe"})):
            same_as_ghost(BOB, op, ref, extra)
    # a bare project name means the caller's own project, never someone else's
    reply = last(BOB, {"op": "show", "session": "secret"})
    assert reply["type"] == "error"
    assert alice["id"] not in str(last(BOB, {"op": "list"}))
    events = last(BOB, {"op": "events", "since": 0})
    assert events["type"] == "result"
    assert all(e.get("user") == BOB for e in events["events"]), events
    assert alice["id"] not in str(events)
    # and alice's session is untouched by all of that
    assert last(ALICE, {"op": "show", "session": alice["id"]})["session"]["state"] == "ready"


def test_message_content_cannot_change_who_the_peer_is(two):
    _, alice, bob, _ = two
    spoof = {"user": BOB, "uid": 0, "gid": 0, "admin": True, "as": BOB, "peer": BOB}
    ping = last(ALICE, {"op": "ping", **spoof})
    assert ping["user"] == ALICE and ping["admin"] is False
    listed = last(ALICE, {"op": "list", **spoof})
    assert [s["id"] for s in listed["sessions"]] == [alice["id"]]
    same_as_ghost(ALICE, "show", bob["id"], spoof)
    same_as_ghost(ALICE, "kill", bob["id"], spoof)
    # ensure with spoofed identity: alice's own session, not bob's
    mine = last(ALICE, {"op": "ensure", "project": "other", **spoof})
    assert mine["type"] == "result" and mine["session"]["user"] == ALICE
    assert mine["session"]["id"] != bob["id"] and mine["session"]["job_id"] != bob["job_id"]
    assert last(BOB, {"op": "show", "session": bob["id"]})["session"]["state"] == "ready"
    # the job SLURM runs belongs to alice, not to the name in the message
    owner = subprocess.run(["squeue", "--noheader", "-j", mine["session"]["job_id"], "-o", "%u"],
                           capture_output=True, text=True, env=tb.slurm_env()).stdout.strip()
    assert owner == ALICE
    assert last(ALICE, {"op": "kill", "session": mine["session"]["id"]})["type"] == "result"


def test_job_files_are_not_writable_by_other_users(two):
    _, alice, _, _ = two
    shown = last(tb.ADMIN, {"op": "show", "session": alice["id"]})["session"]
    script, log = shown["script_path"], shown["log_path"]
    st_script, st_log = os.stat(script), os.stat(log)
    assert st_script.st_uid == 0 and stat.S_IMODE(st_script.st_mode) == 0o600
    st_jobs = os.stat(os.path.dirname(log))   # slurm.job_dir: alice's, private
    assert st_log.st_uid == tb_uid(ALICE) and st_jobs.st_uid == tb_uid(ALICE)
    assert stat.S_IMODE(st_jobs.st_mode) & 0o077 == 0
    for user, path in ((BOB, script), (BOB, log), (ALICE, script), (tb.ADMIN, log)):
        wrote = subprocess.run(["runuser", "-u", user, "--", "sh", "-c", 'printf x >> "$1"', "sh", path],
                               capture_output=True)
        assert wrote.returncode != 0, f"{user} could append to {path}"
    for user in (BOB, tb.ADMIN):
        listing = subprocess.run(["runuser", "-u", user, "--", "ls", os.path.dirname(script)], capture_output=True)
        assert listing.returncode != 0
        swap = subprocess.run(["runuser", "-u", user, "--", "ln", "-sf", "/etc/passwd", log + ".x"],
                              capture_output=True)
        assert swap.returncode != 0


def test_state_dir_is_root_only(two):
    st = os.stat(STATE_DIR)
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o711
    for root, dirs, files in os.walk(STATE_DIR):
        for d in dirs:
            path = os.path.join(root, d)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            assert os.lstat(path).st_uid == 0 and mode & 0o066 == 0, (path, oct(mode))
        for f in files:
            path = os.path.join(root, f)
            s = os.lstat(path)
            assert not stat.S_ISLNK(s.st_mode), path
            assert stat.S_IMODE(s.st_mode) & 0o077 == 0, (path, oct(s.st_mode))
            # job logs are the user's (the job appends to them); everything else is root's
            if not f.endswith(".log"):
                assert s.st_uid == 0, path


def tb_uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid
