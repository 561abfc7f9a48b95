"""Idle culling and walltime warnings on the real cluster, with short limits."""

from __future__ import annotations

import time

import pexpect
import pytest

from tests.cluster import config as tb
from tests.integration.conftest import ALICE, BOB, ensure_as, jobs_of, sbroker_json

from .conftest import attach, audit_entries, instances_of, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

IDLE, GRACE, MARK = 5, 3, 105


@pytest.fixture(scope="module")
def policy(start_broker):
    """alice: nobody attached (must be culled); bob: attached the whole time (must not be)."""
    start_broker(slurm_time_limit="0:02:00", timeouts_idle=IDLE, timeouts_idle_grace=GRACE,
                 timeouts_walltime_warnings=[1800, MARK])
    alice, bob = ensure_as(ALICE, "idle"), ensure_as(BOB, "busy")
    assert alice["type"] == "result" and bob["type"] == "result", (alice, bob)
    child = attach(BOB, bob["session"]["id"])
    yield {"alice": alice["session"], "bob": bob["session"], "child": child}
    if child.isalive():
        child.close(force=True)


def _events(kind: str, session_id: str) -> list[dict]:
    return [e for e in audit_entries() if e["event"] == kind and e.get("session") == session_id]


def test_idle_session_is_warned_then_ended(policy):
    alice = policy["alice"]
    warned = wait_for(lambda: _events("idle_warning", alice["id"]), IDLE + 10, "the idle warning")
    assert warned[0]["limit"] == IDLE and warned[0]["ends_in"] == GRACE
    shown = sbroker_json(tb.ADMIN, "show", alice["id"])
    assert shown["idle_warned"] is True or shown["state"] in ("ending", "ended")
    kill = wait_for(lambda: _events("kill", alice["id"]), GRACE + 10, "the idle end")
    assert kill[0]["by"] == "sbroker" and kill[0]["reason"].startswith("idle for")
    assert kill[0]["ts"] - warned[0]["ts"] >= GRACE - 0.5
    wait_for(lambda: not jobs_of(ALICE), 30, "alice's job to be cancelled")
    wait_for(lambda: alice["instance"] not in instances_of(ALICE), 30, "alice's instance to stop")
    ended = wait_for(lambda: _events("session_ended", alice["id"]), 20, "session_ended")
    assert "idle" in ended[0]["reason"]


def test_attached_session_is_not_culled_and_gets_walltime_warning(policy):
    bob, child = policy["bob"], policy["child"]
    # By the end of this test bob has been attached well past IDLE + GRACE.
    # The walltime warning appears in the attached terminal once time left passes MARK
    # (the 1800 s mark is already passed at the first attach and is reported then).
    child.expect("allocation ends in", timeout=150)
    deadline = time.monotonic() + 150
    warnings = []
    while time.monotonic() < deadline:
        warnings = [e for e in _events("walltime_warning", bob["id"]) if e["mark"] == MARK]
        if warnings:
            break
        try:
            child.expect("allocation ends in", timeout=5)
        except pexpect.TIMEOUT:
            pass
    assert warnings, _events("walltime_warning", bob["id"])
    assert warnings[0]["seconds_left"] <= MARK and warnings[0]["delivered"] == 1
    assert not _events("idle_warning", bob["id"]) and not _events("kill", bob["id"])
    shown = sbroker_json(tb.ADMIN, "show", bob["id"])
    assert shown["state"] == "ready" and shown["attachers"] == 1 and MARK in shown["walltime_warned"]
    # each mark once: no second MARK warning a few seconds later
    time.sleep(3)
    assert len([e for e in _events("walltime_warning", bob["id"]) if e["mark"] == MARK]) == 1
    child.sendline("exit")
    child.expect(pexpect.EOF)
