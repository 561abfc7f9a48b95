"""Item 3: the audit log rotates, ``events`` costs the caller's own entries, no-op kills do not grow it.

bob floods the audit log with lines about himself; alice's ``events`` must neither
read bob's lines nor lose her own, the daemon's loop must not stall while an admin
reads a big log, the files stay bounded, and ``kill`` of an already-ended session
(cheap to repeat) writes one line, not one per request.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker.audit import Audit, Rotation
from broker.client import Client
from broker.config import parse
from broker.looplag import LoopLag
from broker.manager import Manager
from broker.session import Session, State
from broker.slurm.runner import Runner
from broker.store import Store

from ._inproc import serving

PAD = "x" * 300


def rchar() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def make_manager(tmp_path: Path, audit: Audit) -> Manager:
    config = parse({"container": {"image": "/x.sif"}, "broker": {"state_dir": str(tmp_path), "admin_group": "root"}})
    return Manager(config, Runner(path="/usr/bin:/bin"), Store(tmp_path / "s.db"), audit)


def test_rotation_bounds_the_files_and_one_users_flood_keeps_others_history(tmp_path: Path) -> None:
    audit = Audit(tmp_path / "audit.jsonl", Rotation(max_bytes=8192, keep=3, user_max_bytes=8192, user_keep=2))
    for i in range(20):
        audit.record("attach", user="alice", i=i)
    for i in range(3000):
        audit.record("kill", user="bob", i=i, pad=PAD[:40])
    full = sorted(p.name for p in tmp_path.glob("audit.jsonl*") if p.is_file())
    assert full == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    assert max((tmp_path / name).stat().st_size for name in full) <= 8192
    assert [e["i"] for e in audit.read(users={"alice"})] == list(range(20))  # not rotated away by bob
    bobs = audit.read(users={"bob"}, limit=10000)
    assert [e["i"] for e in bobs] == list(range(bobs[0]["i"], 3000))  # contiguous across rotated files
    assert len(bobs) > 8192 // 100  # more than one file's worth


def test_events_reads_only_the_callers_entries_and_never_on_the_loop(tmp_path: Path) -> None:
    audit = Audit(tmp_path / "audit.jsonl")
    for i in range(10):
        audit.record("attach", user="alice", i=i)
    for i in range(80000):
        audit.record("kill", user="bob", i=i, pad=PAD)
    size = (tmp_path / "audit.jsonl").stat().st_size
    assert size > 25_000_000
    before = rchar()
    mine = audit.read(users={"alice"})
    read = rchar() - before
    assert [e["i"] for e in mine] == list(range(10))
    assert read < 64 * 1024, f"alice's 10 entries cost {read} bytes of a {size}-byte log"

    lag = LoopLag(interval=0.01)
    with serving(make_manager(tmp_path, audit)) as (socket_path, loop):
        ticker = asyncio.run_coroutine_threadsafe(lag.run(), loop)
        try:
            with Client(socket_path, timeout=60) as client:  # root is in the admin group "root"
                events = client.request("events", limit=10000)["events"]
        finally:
            loop.call_soon_threadsafe(ticker.cancel)
    assert len(events) == 10000 and events[-1]["i"] == 79999
    assert lag.summary().max < 0.1, f"the event loop stalled {lag.summary().max:.3f}s during an admin's events"


def test_kill_of_an_ended_session_writes_one_line_not_one_per_request(tmp_path: Path) -> None:
    audit = Audit(tmp_path / "audit.jsonl")
    manager = make_manager(tmp_path, audit)
    ended = Session(user="root", uid=0, project="p", state=State.ENDED, job_id="42", reason="done")
    manager.store.save(ended)
    with serving(manager) as (socket_path, _loop):
        for _ in range(50):
            with Client(socket_path, timeout=10) as client:
                assert client.request("kill", session=ended.id)["session"]["state"] == "ended"
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 1, lines[:3]


def test_a_full_disk_is_reported_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    audit = Audit(tmp_path / "audit.jsonl")

    def no_space(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", no_space)
    with capture_logs() as logs:
        entry = audit.record("kill", user="bob")
    assert entry["event"] == "kill" and audit.failures >= 1
    assert {e["event"] for e in logs} == {"audit_write_failed"}
