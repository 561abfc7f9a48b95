"""A full disk under the audit log is reported (log line, metric), never fatal."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import ALICE, ensure_as, jobs_of, sbroker, sbroker_json
from tests.integration.daemon import LOG_PATH

from .conftest import metric_samples, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

FULL = Path("/run/sbroker-test-fullfs")


@pytest.fixture(scope="module")
def full_fs():
    FULL.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "sbroker-test-full", str(FULL)], check=True)
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={FULL}/filler", "bs=4k"], capture_output=True)
        yield FULL
    finally:
        subprocess.run(["umount", str(FULL)])
        FULL.rmdir()


def test_full_disk_for_audit_log_is_reported_not_fatal(start_broker, full_fs):
    log_start = LOG_PATH.stat().st_size if LOG_PATH.exists() else 0
    start_broker(broker_audit_log=str(full_fs / "audit.jsonl"))
    reply = ensure_as(ALICE, "fulldisk")
    assert reply["type"] == "result", reply  # the session starts anyway
    session = reply["session"]
    failures = metric_samples()[("sbroker_audit_write_failures_total", ())]
    assert failures >= 1
    with open(LOG_PATH, "rb") as fh:
        fh.seek(log_start)
        log = fh.read().decode(errors="replace")
    assert '"audit_write_failed"' in log and "No space left on device" in log
    # Still fully working: kill (another audit write that fails) ends the job.
    sbroker(ALICE, "kill", session["id"])
    wait_for(lambda: not jobs_of(ALICE), 30, "the job to end")
    assert metric_samples()[("sbroker_audit_write_failures_total", ())] > failures
    wait_for(lambda: sbroker_json(ALICE, "ls") == [], 15, "the session to end")
    assert sbroker(ALICE, "events", "--json").stdout == ""
