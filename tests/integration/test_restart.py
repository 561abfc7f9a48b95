"""Daemon restarts and start failures: each test runs its own broker (no shared fixture)."""

from __future__ import annotations

import os
import subprocess
import time
import tomllib

import pytest

from broker import images, jobspec
from broker.config import parse
from broker.identity import lookup_name
from broker.slurm.runner import user_env
from tests.cluster import config as tb
from tests.ops.conftest import METRICS_SOCKET, metric_samples
from tests.waiting import wait_for

from .conftest import ALICE, ensure_as, jobs_of, sbroker, sbroker_json, tagged_jobs
from .daemon import BrokerProcess, config_text, reset_state

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
    proc = BrokerProcess(slurm_command_timeout=5.0, broker_metrics_socket=str(METRICS_SOCKET))
    proc.start()
    cycles = ("sbroker_poll_cycle_seconds_count", ())
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
        # Another poll fails against the dead controller (each waits out the 5 s command
        # timeout), past the gone-grace (2 s): still nothing ended.
        seen = metric_samples()[cycles]
        unknown_since = time.monotonic()
        wait_for(lambda: metric_samples()[cycles] > seen and time.monotonic() - unknown_since > 2.5, 30,
                 "another poll cycle while the controller is down")
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


def submit_tagged(user: str, project: str) -> str:
    """A session job of ``(user, project)`` submitted behind this broker's back, exactly as a
    broker submits one (another login node's, or one whose id a crash lost): the same start
    script on stdin, the same argv and tags, as the user with a clean environment."""
    cfg = parse(tomllib.loads(config_text()))
    who = lookup_name(user)
    image = images.resolve(cfg.image)
    spec = jobspec.build(cfg, who, project, str(image), images.digest(image))
    env = [f"{k}={v}" for k, v in user_env(who, path=cfg.path, slurm_conf=cfg.slurm_conf).items()]
    subprocess.run(["runuser", "-u", user, "--", "env", "-i", *env, "mkdir", "-p", "--", spec.host_project_dir],
                   check=True, timeout=30, cwd="/")
    out = subprocess.run(["runuser", "-u", user, "--", "env", "-i", *env, *spec.sbatch_argv], input=spec.script,
                         capture_output=True, text=True, check=True, timeout=60, cwd=who.home).stdout
    return out.strip().split(";")[0]


def test_restart_adopts_an_unknown_tagged_job_and_cancels_a_duplicate(cluster):
    """Two jobs behind the broker's back: a second job for a live session's key (it waits on the
    singleton dependency) and a job for a key the broker has never seen. After a restart the
    duplicate is cancelled and the session keeps its job; the unknown job is adopted: its
    session is ready and the next login joins it instead of submitting."""
    reset_state()
    proc = BrokerProcess()
    proc.start()
    try:
        session = ensure_as(ALICE, "kept")["session"]
        duplicate = submit_tagged(ALICE, "kept")
        stray = submit_tagged(ALICE, "stray")
        assert int(session["job_id"]) < int(duplicate)
        proc.restart()
        wait_for(lambda: duplicate not in {j["job_id"] for j in jobs_of(ALICE)}, 30,
                 lambda: f"the duplicate job {duplicate} cancelled ({jobs_of(ALICE)})")
        again = ensure_as(ALICE, "kept")["session"]
        assert (again["id"], again["job_id"], again["state"]) == (session["id"], session["job_id"], "ready")
        adopted = ensure_as(ALICE, "stray")["session"]
        assert (adopted["job_id"], adopted["state"]) == (stray, "ready"), adopted
        assert sorted(j["job_id"] for j in jobs_of(ALICE)) == sorted([session["job_id"], stray])
        listed = {s["project"]: s["job_id"] for s in sbroker_json(tb.ADMIN, "ls")}
        assert listed == {"kept": session["job_id"], "stray": stray}
    finally:
        proc.stop()
        reset_state()
