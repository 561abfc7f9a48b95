"""The manager's guards on a session's job, on the real cluster: the pending timeout, the start
timeout and the requeue guard. Each ends the session with its reason and cancels the job, so
nothing is left to run (or rerun) behind the broker's back.

==================  ==========================================================================
guard               how it is provoked
==================  ==========================================================================
pending timeout     the session's partition (``node1``) is DOWN: its job pends
start timeout       the ``apptainer`` gate holds ``instance start`` in the running job: no
                    ``INSTANCE_READY`` ever comes
requeued job        an administrator requeues a ready session's job (``scontrol update
                    Requeue=1`` then ``scontrol requeue``): it goes back to pending, and would
                    later rerun the start script for an instance that died with the first run
==================  ==========================================================================
"""

from __future__ import annotations

import time

import pytest

from tests.integration.conftest import ensure_as

from .conftest import (ALICE, BrokerProcess, active_tagged_jobs, close_gate, gate_path, instances_of,
                       open_all_gates, scontrol, store_rows, wait_for)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TIMEOUT = 3


def alice_jobs() -> list[str]:
    return [j["job_id"] for j in active_tagged_jobs() if j["user"] == ALICE]


def rows_of(project: str) -> list[dict]:
    return [r for r in store_rows().values() if r["project"] == project]


def test_pending_timeout_cancels_the_job_and_fails_with_the_pending_reason(fresh):
    proc = BrokerProcess(slurm_partition="node1", timeouts_pending=TIMEOUT, slurm_poll_interval=0.5,
                         slurm_gone_grace=1.0)
    proc.start()
    scontrol("update", "partitionname=node1", "state=DOWN")
    try:
        started = time.monotonic()
        reply = ensure_as(ALICE, "pendingto")
        elapsed = time.monotonic() - started
        want = f"job pending longer than {TIMEOUT}s (PartitionDown)"
        assert reply["type"] == "error" and reply["message"] == want, reply
        assert TIMEOUT <= elapsed < TIMEOUT + 10, elapsed
        wait_for(lambda: not alice_jobs(), 15, lambda: f"the pending job cancelled ({alice_jobs()})")
        assert [(r["state"], r["reason"]) for r in rows_of("pendingto")] == [("failed", want)]
    finally:
        scontrol("update", "partitionname=node1", "state=UP")
        proc.stop()


def test_start_timeout_cancels_the_job_and_fails_with_the_reason(fresh):
    proc = BrokerProcess(slurm_path=gate_path(), timeouts_start=TIMEOUT, slurm_poll_interval=0.5,
                         slurm_gone_grace=1.0)
    proc.start()
    close_gate("apptainer")
    try:
        started = time.monotonic()
        reply = ensure_as(ALICE, "startto")
        elapsed = time.monotonic() - started
        want = f"no INSTANCE_READY within {TIMEOUT}s of the job starting"
        assert reply["type"] == "error" and reply["message"] == want, reply
        assert TIMEOUT <= elapsed < TIMEOUT + 10, elapsed
        wait_for(lambda: not alice_jobs(), 15, lambda: f"the running job cancelled ({alice_jobs()})")
        assert [(r["state"], r["reason"]) for r in rows_of("startto")] == [("failed", want)]
        assert instances_of(ALICE) == set()
    finally:
        open_all_gates()
        proc.stop()


def test_a_requeued_job_is_cancelled_and_its_session_ends_with_the_reason(fresh):
    proc = BrokerProcess(slurm_poll_interval=0.5, slurm_gone_grace=1.0)
    proc.start()
    try:
        first = ensure_as(ALICE, "requeued")["session"]
        assert first["state"] == "ready", first
        job = first["job_id"]
        scontrol("update", f"jobid={job}", "requeue=1")   # session jobs are --no-requeue: an admin's choice
        scontrol("requeue", job)
        row = wait_for(lambda: store_rows()[first["id"]]["state"] == "ended" and store_rows()[first["id"]], 30,
                       lambda: f"the session to end ({store_rows()[first['id']]})")
        assert row["reason"].startswith("job was requeued by SLURM") and "its instance is gone" in row["reason"], row
        wait_for(lambda: job not in alice_jobs(), 15, lambda: f"the requeued job {job} cancelled ({alice_jobs()})")
        # The next login gets a new allocation and a new instance; nothing of the first is left.
        again = ensure_as(ALICE, "requeued")["session"]
        assert again["state"] == "ready" and again["id"] != first["id"] and again["job_id"] != job, again
        assert alice_jobs() == [again["job_id"]]
        wait_for(lambda: instances_of(ALICE) == {again["instance"]}, 15,
                 lambda: f"only the new instance running ({instances_of(ALICE)})")
    finally:
        proc.stop()
