"""The manager's truth table and marker reader, without SLURM (pure state logic)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from broker.audit import Audit
from broker.config import parse
from broker.manager import MIN_POLL_GAP, Manager, _MarkerReader, parse_marker
from broker.session import Session, State
from broker.slurm.parse import JobInfo
from broker.slurm.runner import Result, Runner
from broker.store import Store


@pytest.fixture
def manager(tmp_path):
    config = parse({"container": {"image": "/i.sif"}, "slurm": {"gone_grace": 10.0}})
    return Manager(config, Runner(path="/usr/bin:/bin"), Store(tmp_path / "s.db"), Audit(tmp_path / "a.jsonl"))


def info(state, reason="None", nodes="vm", start="N/A", left="1:00:00"):
    return JobInfo("7", state, reason, nodes, start, left, "alice", "sb", "", 1000)


def tracked(manager, state):
    s = Session(user="alice", uid=1000, project="p", job_id="7")
    s.move(State.SUBMITTED)
    if state in (State.STARTING, State.READY):
        s.move(State.STARTING)
    if state == State.READY:
        s.move(State.READY)
    manager._track(s)
    return s


def test_pending_then_running_then_gone_after_grace(manager):
    s = tracked(manager, State.SUBMITTED)
    manager.apply(s, info("PENDING", "Resources", start="2026-11-29T12:00:00"), 100.0)
    assert s.state == State.PENDING and s.pending_reason == "Resources"
    assert "expected start 2026-11-29T12:00:00" in s.reason
    manager.apply(s, info("RUNNING"), 101.0)
    assert s.state == State.STARTING and s.node == "vm"


def test_absent_job_ends_only_after_grace(manager):
    s = tracked(manager, State.READY)
    manager.apply(s, None, 100.0)
    manager.apply(s, None, 105.0)
    assert s.state == State.READY
    manager.apply(s, None, 110.5)
    assert s.state == State.ENDED and "no longer known" in s.reason


def test_reappearing_job_resets_grace(manager):
    s = tracked(manager, State.READY)
    manager.apply(s, None, 100.0)
    manager.apply(s, info("RUNNING"), 105.0)
    manager.apply(s, None, 112.0)
    assert s.state == State.READY


def test_controller_down_marks_unknown_and_restores(manager):
    s = tracked(manager, State.READY)
    manager._controller_down("timed out", [s])
    assert s.state == State.UNKNOWN and not manager.controller_ok
    manager.apply(s, info("RUNNING"), 100.0)
    assert s.state == State.READY


def test_job_end_before_ready_is_a_failure_with_reason(manager, tmp_path):
    s = tracked(manager, State.STARTING)
    log = tmp_path / "job.log"
    log.write_text("noise\nINSTANCE_FAILED: exit 255: FATAL: could not open image\n")
    s.log_path = str(log)
    s.user = _me().name  # the log is read as the session's user
    manager.apply(s, info("FAILED", "NonZeroExitCode"), 100.0)
    assert s.state == State.FAILED
    assert s.reason == "instance failed to start: exit 255: FATAL: could not open image"


def test_launch_failure_names_the_job_dir_as_the_probable_cause(manager, tmp_path):
    s = tracked(manager, State.SUBMITTED)
    s.log_path = str(tmp_path / "jobs" / "sb-x.log")
    manager.apply(s, info("FAILED", "JobLaunchFailure", nodes="node2"), 100.0)
    assert s.state == State.FAILED
    assert s.reason == (f"job failed (JobLaunchFailure) before the instance was ready: probably slurm.job_dir"
                        f" ({tmp_path / 'jobs'}) is missing or not writable on node2 (SLURM could not open"
                        " the job's output there)")


async def test_a_session_failed_for_a_reason_keeps_it_when_the_poller_sees_its_job_end(manager, monkeypatch):
    """The broker fails a session for a reason it found (a node-local job dir, a start
    timeout) and cancels its job; the next poll sees that job "completing" or "cancelled".
    The user must read the first reason, and the failure is counted and audited once."""
    s = tracked(manager, State.STARTING)
    cancelled = []

    async def scancel(session):
        cancelled.append(session.job_id)
        manager.apply(session, info("COMPLETING"), 100.0)  # a poll lands while scancel runs

    monkeypatch.setattr(manager, "_scancel", scancel)
    await manager._cancel_failed(s, "slurm.job_dir (/tmp) is node-local")
    manager.apply(s, info("CANCELLED"), 101.0)
    assert cancelled == ["7"]
    assert (s.state, s.reason) == (State.FAILED, "slurm.job_dir (/tmp) is node-local")
    assert sum(manager.failures.values()) == 1


def test_timeout_and_cancelled_ready_session_end(manager):
    s = tracked(manager, State.READY)
    manager.apply(s, info("TIMEOUT", "TimeLimit"), 100.0)
    assert s.state == State.ENDED and s.reason == "job timeout (TimeLimit)"


@pytest.mark.parametrize("line, marker", [
    ("INSTANCE_READY", ("INSTANCE_READY", "")), ("  INSTANCE_READY \r", ("INSTANCE_READY", "")),
    ("INSTANCE_FAILED: exit 1: boom", ("INSTANCE_FAILED", "exit 1: boom")),
    ("INSTANCE_FAILED", ("INSTANCE_FAILED", "")), ("echo INSTANCE_READY", None), ("INSTANCE_READYX", None),
])
def test_parse_marker(line, marker):
    assert parse_marker(line) == marker


def _me():
    import os
    import pwd
    from broker.identity import User
    pw = pwd.getpwuid(os.geteuid())
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, (), pw.pw_dir, pw.pw_shell)


def _nobody():
    import pwd
    from broker.identity import User
    pw = pwd.getpwnam("nobody")
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, (), pw.pw_dir, pw.pw_shell)


def test_marker_reader_waits_for_complete_lines(tmp_path):
    path = tmp_path / "log"
    reader = _MarkerReader(_me(), str(path))
    assert reader.poll() is None and not reader.seen  # no file yet
    path.write_bytes(b"starting\nINSTANCE_RE")
    assert reader.poll() is None and reader.seen
    with open(path, "ab") as fh:
        fh.write(b"ADY\n")
    assert reader.poll() == ("INSTANCE_READY", "")


def test_marker_reader_reads_a_flood_in_bounded_chunks(tmp_path):
    """A user's log of millions of empty lines costs each poll at most READ_CHUNK bytes."""
    from broker.manager import READ_CHUNK
    path = tmp_path / "log"
    path.write_bytes(b"\n" * (4 * READ_CHUNK + 10) + b"INSTANCE_READY\n")
    reader = _MarkerReader(_me(), str(path))
    offsets = []
    marker = None
    while marker is None and len(offsets) < 10:
        marker = reader.poll()
        offsets.append(reader.offset)
    assert marker == ("INSTANCE_READY", "")
    steps = [b - a for a, b in zip([0, *offsets], offsets)]
    assert max(steps) <= READ_CHUNK and len(offsets) == 5


@pytest.mark.skipif(os.geteuid() != 0, reason="reading as another user needs root")
def test_marker_reader_reads_as_the_user_not_as_root(tmp_path):
    """A link in the user's job dir to a root-only file is followed with the user's rights:
    the marker in the root-only file is never read."""
    import tempfile
    shared = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        shared.chmod(0o755)
        secret = shared / "secret"
        secret.write_text("INSTANCE_READY\n")
        secret.chmod(0o600)
        link = shared / "log"
        link.symlink_to(secret)
        assert _MarkerReader(_nobody(), str(link)).poll() is None
        assert _MarkerReader(_me(), str(link)).poll() == ("INSTANCE_READY", "")
        secret.chmod(0o644)
        assert _MarkerReader(_nobody(), str(link)).poll() == ("INSTANCE_READY", "")
    finally:
        import shutil
        shutil.rmtree(shared)


def test_finished_sessions_leave_memory_but_stay_findable(manager):
    s = tracked(manager, State.READY)
    manager.apply(s, info("COMPLETED"), 100.0)
    assert s.state == State.ENDED
    assert s.id not in manager.sessions and manager.current("alice", "p") is None
    assert manager.finished["ended"] == 1
    from broker.identity import User

    owner = User("alice", 1000, 1000, (1000,), "/home/alice", "/bin/bash")
    assert manager.resolve(s.id, owner, admin=False).state == State.ENDED  # from the store


def test_instance_names_keep_their_token_when_names_are_long():
    from broker.jobspec import instance_name

    user, project = "u" * 32, "p" * 32
    a, b = instance_name(user, project, "aaaaaa"), instance_name(user, project, "bbbbbb")
    assert a != b and a.endswith("-aaaaaa") and len(a) <= 64
    assert instance_name("alice", "proj1", "0f0f0f") == "sb-alice-proj1-0f0f0f"


class CountingRunner(Runner):
    """Answers every command at once with no jobs, and counts the ``squeue`` calls."""

    def __init__(self) -> None:
        super().__init__(path="/usr/bin:/bin")
        self.squeues = 0

    async def run(self, argv, **kwargs):  # type: ignore[override]
        self.squeues += argv[0] == "squeue"
        return Result(list(argv), 0, "", "", 0.0)


async def test_a_burst_of_wakes_shares_polls(tmp_path):
    config = parse({"container": {"image": "/i.sif"}, "slurm": {"poll_interval": 30.0}})
    runner = CountingRunner()
    manager = Manager(config, runner, Store(tmp_path / "s.db"), Audit(tmp_path / "a.jsonl"))
    tracked(manager, State.READY)
    poller = asyncio.ensure_future(manager.run_poller())
    try:
        began = time.monotonic()
        for _ in range(50):  # a login storm: 50 wakes within a second
            manager._wake.set()
            await asyncio.sleep(0.02)
        await asyncio.sleep(MIN_POLL_GAP)
        seconds = time.monotonic() - began
    finally:
        poller.cancel()
    assert 1 <= runner.squeues <= seconds / MIN_POLL_GAP + 2, (runner.squeues, seconds)


class RecordingRunner(Runner):
    """Answers every command at once and records ``(argv, user name)``."""

    def __init__(self) -> None:
        super().__init__(path="/usr/bin:/bin")
        self.calls: list[tuple[list[str], str | None]] = []

    async def run(self, argv, user=None, **kwargs):  # type: ignore[override]
        self.calls.append((list(argv), user.name if user else None))
        return Result(list(argv), 0, "", "", 0.0)




def _alice():
    from broker.identity import User

    return User("alice", 1000, 1000, (1000,), "/home/alice", "/bin/bash")


@pytest.fixture
def recording(tmp_path, monkeypatch):
    """A manager whose SLURM commands are recorded, and whose only user is alice (uid 1000)."""
    config = parse({"container": {"image": "/i.sif"}, "slurm": {"gone_grace": 10.0}})
    runner = RecordingRunner()
    mgr = Manager(config, runner, Store(tmp_path / "s.db"), Audit(tmp_path / "a.jsonl"))
    monkeypatch.setattr(mgr, "_owner", lambda session: _alice() if session.user == "alice" else None)
    monkeypatch.setattr(mgr, "owner_of", lambda info: _alice() if info.uid == 1000 else None)
    return mgr, runner


async def _settle(mgr) -> None:
    for task in list(mgr._tasks):
        await asyncio.wait_for(task, 5)


@pytest.mark.parametrize("state", [State.STARTING, State.READY])
async def test_a_requeued_job_ends_its_session_and_is_cancelled_as_its_owner(recording, state):
    """Requeued (node failure, an admin): the job pends again and would rerun the start script
    later for an instance that died with the first run; the session ends, the job is cancelled."""
    mgr, runner = recording
    s = tracked(mgr, state)
    mgr.apply(s, info("PENDING", "BeginTime"), 100.0)
    assert s.state == State.ENDING
    assert s.reason == "job was requeued by SLURM (BeginTime); its instance is gone"
    await _settle(mgr)
    assert runner.calls == [(["scancel", "7"], "alice")]
    mgr.apply(s, info("CANCELLED"), 101.0)
    assert s.state == State.ENDED and s.reason.startswith("job was requeued by SLURM")


async def test_an_unknown_older_tagged_job_of_a_live_key_wins_and_the_newer_is_cancelled(recording):
    """Two live jobs for one key (two login nodes raced): the oldest is the key's job everywhere.
    The session moves to it and its own newer job is cancelled, as the user."""
    mgr, runner = recording
    s = tracked(mgr, State.READY)   # job 7
    older = JobInfo("5", "RUNNING", "None", "node2", "N/A", "1:00:00", "alice", "sbroker-session-p",
                    "sbroker/v1 user=alice project=p instance=sb-alice-p-0a0a0a digest=0", 1000)
    mgr._adopt(older, {"user": "alice", "project": "p", "instance": "sb-alice-p-0a0a0a"}, 100.0)
    assert (s.job_id, s.instance, s.node) == ("5", "sb-alice-p-0a0a0a", "node2")
    assert mgr.current("alice", "p") is s and len([x for x in mgr.sessions.values() if x.live]) == 1
    await _settle(mgr)
    assert runner.calls == [(["scancel", "7"], "alice")]


async def test_an_unknown_newer_tagged_job_of_a_live_key_is_a_duplicate_and_is_cancelled(recording):
    mgr, runner = recording
    s = tracked(mgr, State.READY)   # job 7
    newer = JobInfo("9", "PENDING", "Dependency", "", "N/A", "1:00:00", "alice", "sbroker-session-p",
                    "sbroker/v1 user=alice project=p instance=sb-alice-p-0b0b0b digest=0", 1000)
    mgr._adopt(newer, {"user": "alice", "project": "p", "instance": "sb-alice-p-0b0b0b"}, 100.0)
    assert (s.job_id, s.state) == ("7", State.READY) and mgr.current("alice", "p") is s
    [dup] = [x for x in mgr.sessions.values() if x.job_id == "9"]
    assert dup.state == State.ENDING and dup.reason == "duplicate of job 7"
    await _settle(mgr)
    assert runner.calls == [(["scancel", "9"], "alice")]


async def test_an_unknown_tagged_job_of_a_new_key_is_adopted_as_its_session(recording):
    mgr, runner = recording
    job = JobInfo("11", "PENDING", "Priority", "", "N/A", "1:00:00", "alice", "sbroker-session-q",
                  "sbroker/v1 user=alice project=q instance=sb-alice-q-0c0c0c digest=0", 1000)
    mgr._adopt(job, {"user": "alice", "project": "q", "instance": "sb-alice-q-0c0c0c", "digest": "0"}, 100.0)
    s = mgr.current("alice", "q")
    assert (s.job_id, s.instance, s.state, s.uid) == ("11", "sb-alice-q-0c0c0c", State.PENDING, 1000)
    assert mgr.store.get(s.id).job_id == "11"
    await _settle(mgr)
    assert runner.calls == []


async def test_a_login_while_the_session_is_ending_waits_for_it_to_end_then_starts_afresh(manager):
    s = tracked(manager, State.READY)
    manager.transition(s, State.ENDING, "killed by alice")
    seen = []
    waiter = asyncio.ensure_future(manager._await_ended(s, seen.append))
    await asyncio.wait_for(_until(lambda: seen), 5)  # it said why the login waits
    assert seen[0]["state"] == "ending" and "killed by alice" in seen[0]["reason"]
    manager.transition(s, State.ENDED, "job gone")
    assert await asyncio.wait_for(waiter, 5) is None  # nothing holds the key: the login makes a new one


async def test_a_session_that_never_ends_is_said_so_after_the_bound(manager, monkeypatch):
    import broker.manager as m

    monkeypatch.setattr(m, "ENDING_WAIT", 0.3)
    s = tracked(manager, State.READY)
    manager.transition(s, State.ENDING, "killed by alice")
    with pytest.raises(m.SessionError, match=r"still ending \(killed by alice\) after 0.3s"):
        await asyncio.wait_for(manager._await_ended(s, None), 5)


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def test_a_requeue_seen_through_completing_is_still_cancelled(recording):
    """The poller may see the requeued job COMPLETING before it pends again: the session is
    ending then, not ended, so the job that comes back is still cancelled as its owner."""
    mgr, runner = recording
    s = tracked(mgr, State.READY)
    mgr.apply(s, info("COMPLETING"), 100.0)
    assert (s.state, s.reason) == (State.ENDING, "job completing")
    mgr.apply(s, info("PENDING", "BeginTime"), 101.0)
    assert (s.state, s.reason) == (State.ENDING, "job was requeued by SLURM (BeginTime); its instance is gone")
    await _settle(mgr)
    assert ["scancel", "7"] in [argv for argv, _ in runner.calls]
    mgr.apply(s, info("CANCELLED"), 102.0)
    assert s.state == State.ENDED and s.reason.startswith("job was requeued by SLURM")


def test_a_job_that_completes_and_leaves_ends_its_session_after_the_grace(manager):
    s = tracked(manager, State.READY)
    manager.apply(s, info("COMPLETING"), 100.0)
    assert s.state == State.ENDING
    manager.apply(s, None, 101.0)
    manager.apply(s, None, 111.5)
    assert (s.state, s.reason) == (State.ENDED, "job completing")
