"""Daemon restarts and start failures: each test runs its own broker (no shared fixture)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.cluster import config as tb

from .conftest import ALICE, ensure_as, jobs_of, sbroker, sbroker_json, tagged_jobs
from .daemon import BrokerProcess, reset_state

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_failing_image_fails_fast_with_reason_and_no_job(cluster):
    """A start script failure is reported within seconds, with its reason, and the job is gone."""
    reset_state()
    broken = tb.IMAGES / "broken-test.sif"
    broken.write_bytes(b"not an image")
    os.chmod(broken, 0o644)
    proc = BrokerProcess(container_image=str(broken))
    proc.start()
    try:
        started = time.monotonic()
        reply = ensure_as(ALICE, "broken")
        elapsed = time.monotonic() - started
        assert reply["type"] == "error", reply
        assert "instance failed to start" in reply["message"]
        assert elapsed < 15
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and jobs_of(ALICE):
            time.sleep(0.3)
        assert jobs_of(ALICE) == []
    finally:
        proc.stop()
        broken.unlink()
        reset_state()


def test_kill9_restart_readopts_then_external_scancel_ends(cluster):
    reset_state()
    proc = BrokerProcess()
    proc.start()
    try:
        before = tagged_jobs(ALICE)
        session = ensure_as(ALICE, "phoenix")["session"]
        proc.kill9()
        proc.start()
        again = ensure_as(ALICE, "phoenix")["session"]
        assert again["id"] == session["id"] and again["job_id"] == session["job_id"]
        assert again["state"] == "ready"
        assert tagged_jobs(ALICE) - before == {session["job_id"]}
        subprocess.run(tb.as_user(ALICE, "scancel", session["job_id"]), check=True, cwd="/")
        deadline = time.monotonic() + 1.0 * 1.1 + 2.0 + 10  # poll cycle + grace + margin
        state = None
        while time.monotonic() < deadline:
            listed = {s["id"]: s for s in sbroker_json(tb.ADMIN, "ls")}
            if session["id"] not in listed:
                state = "gone"
                break
            time.sleep(0.3)
        assert state == "gone"
        events = [e["event"] for e in sbroker_json_lines(tb.ADMIN, "events")]
        assert "session_ended" in events
    finally:
        proc.stop()
        reset_state()


def sbroker_json_lines(user: str, *args: str) -> list[dict]:
    import json

    out = sbroker(user, *args, "--json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]




def test_controller_outage_marks_unknown_never_ends_and_recovers(cluster):
    """slurmctld stopped: sessions go ``unknown`` (nothing torn down), logins get a clear
    "controller unavailable", and everything is ready again once it is back."""
    from tests.cluster import harness

    reset_state()
    proc = BrokerProcess(slurm_command_timeout=5.0)
    proc.start()
    try:
        session = ensure_as(ALICE, "outage")["session"]
        pid = harness.SLURMCTLD.pid()
        assert pid
        harness.terminate([pid], "slurmctld")
        deadline = time.monotonic() + 30
        state = None
        while time.monotonic() < deadline:
            state = sbroker_json(tb.ADMIN, "show", session["id"])["state"]
            if state == "unknown":
                break
            time.sleep(0.5)
        assert state == "unknown"
        reply = ensure_as(ALICE, "outage")
        assert reply["type"] == "error" and reply["code"] == "controller_unavailable", reply
        time.sleep(5)  # well past the poll interval and the grace: still nothing ended
        assert sbroker_json(tb.ADMIN, "show", session["id"])["state"] == "unknown"
    finally:
        harness.ensure_slurm(conf_changed=False)
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if sbroker_json(tb.ADMIN, "show", session["id"])["state"] == "ready":
                break
            time.sleep(0.5)
        again = ensure_as(ALICE, "outage")["session"]
        assert again["id"] == session["id"] and again["job_id"] == session["job_id"]
        assert again["state"] == "ready"
    finally:
        proc.stop()
        reset_state()


def test_lost_store_readopts_tagged_job_without_second_allocation(cluster):
    """The store is lost (disk replaced, another login node): the job's tags in SLURM bring the
    session back, ready, and no second job is submitted."""
    from .daemon import STATE_DIR

    reset_state()
    proc = BrokerProcess()
    proc.start()
    try:
        before = tagged_jobs(ALICE)
        session = ensure_as(ALICE, "tagged")["session"]
        proc.stop()
        (STATE_DIR / "sessions.db").unlink()
        for extra in ("sessions.db-wal", "sessions.db-shm"):
            (STATE_DIR / extra).unlink(missing_ok=True)
        proc.start()
        again = ensure_as(ALICE, "tagged")["session"]
        assert again["job_id"] == session["job_id"]
        assert again["instance"] == session["instance"]
        assert again["state"] == "ready"
        assert tagged_jobs(ALICE) - before == {session["job_id"]}
    finally:
        proc.stop()
        reset_state()
