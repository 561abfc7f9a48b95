"""Session state machine and its SQLite persistence."""

from __future__ import annotations

import os

import pytest

from broker.session import Session, State, TransitionError
from broker.store import SCHEMA_VERSION, Store


def test_happy_path_and_timestamps():
    s = Session(user="alice", uid=1000, project="p")
    for state in (State.SUBMITTED, State.PENDING, State.STARTING, State.READY, State.ENDING, State.ENDED):
        s.move(state)
    assert s.ready_at and s.ended_at and not s.live


@pytest.mark.parametrize("path", [
    [State.READY], [State.SUBMITTED, State.REQUESTED], [State.FAILED, State.READY],
    [State.SUBMITTED, State.READY, State.STARTING],
])
def test_illegal_transitions_raise(path):
    s = Session(user="alice", uid=1000, project="p")
    with pytest.raises(TransitionError):
        for state in path:
            s.move(state)


def test_unknown_remembers_and_restores_previous_state():
    s = Session(user="a", uid=1, project="p")
    s.move(State.SUBMITTED)
    s.move(State.READY)
    s.move(State.UNKNOWN, "controller down")
    assert s.prev_state == State.READY and s.live
    s.move(s.prev_state)
    assert s.state == State.READY and s.prev_state is None


def test_store_roundtrip_live_only_and_private(tmp_path):
    store = Store(tmp_path / "state" / "sessions.db")
    live = Session(user="a", uid=1, project="p", job_id="5")
    live.move(State.SUBMITTED)
    dead = Session(user="b", uid=2, project="q")
    dead.move(State.FAILED, "boom")
    store.save(live)
    store.save(dead)
    live.move(State.READY)
    store.save(live)
    assert [s.id for s in store.live()] == [live.id]
    again = store.get(live.id)
    assert again.state == State.READY and again.job_id == "5"
    assert store.get(dead.id).reason == "boom"
    assert os.stat(tmp_path / "state" / "sessions.db").st_mode & 0o077 == 0
    version = store.db.execute("PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_store_refuses_newer_schema(tmp_path):
    store = Store(tmp_path / "s.db")
    store.db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    store.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(tmp_path / "s.db")


def test_prune_finished_keeps_live_and_recent(tmp_path):
    store = Store(tmp_path / "s.db")
    old_dead, new_dead, old_live = (Session(user="a", uid=1, project=p) for p in ("x", "y", "z"))
    old_dead.move(State.FAILED, "boom")
    new_dead.move(State.FAILED, "boom")
    old_live.move(State.SUBMITTED)
    old_dead.updated = old_live.updated = 1000.0
    for s in (old_dead, new_dead, old_live):
        store.save(s)
    assert store.prune_finished(before=2000.0) == 1
    assert store.get(old_dead.id) is None
    assert store.get(new_dead.id) is not None and store.get(old_live.id) is not None
