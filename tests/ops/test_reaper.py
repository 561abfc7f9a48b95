"""The reaper on the real cluster: orphan tagged job, stale instance state, old job files; dry run first."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster import config as tb
from tests.integration.conftest import ALICE, jobs_of, sbroker
from tests.integration.daemon import STATE_DIR

from .conftest import audit_entries, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ORPHAN = "sb-sbalice-orphan-0a1b2c"
GHOST = "sb-sbalice-ghost-3d4e5f"
START_TIMEOUT = 4


def _submit_orphan() -> str:
    """A tagged job as alice that never starts an instance (what hygiene can miss)."""
    comment = f"sbroker/v1 user={ALICE} project=orphan instance={ORPHAN} digest=0"
    out = subprocess.run(tb.as_user(ALICE, "sbatch", "--parsable", f"--partition={tb.PARTITION}", "--time=5",
                                    "--mem=100M", f"--comment={comment}", "--output=/dev/null",
                                    "--wrap=sleep 300"),
                         capture_output=True, text=True, check=True, cwd="/").stdout
    return out.strip().split(";")[0]


def _ghost_dir() -> Path:
    home = Path(f"/home/{ALICE}")
    return home / ".apptainer/instances/app" / os.uname().nodename / ALICE / GHOST


def _make_ghost_and_keeper() -> tuple[Path, Path]:
    ghost = _ghost_dir()
    keeper = ghost.parent / "my-own-instance"
    state = json.dumps({"pid": 4194300, "ppid": 4194301, "name": GHOST, "user": ALICE})
    script = (f"mkdir -p {ghost} {keeper} && printf '%s' '{state}' > {ghost}/{GHOST}.json && "
              f"touch -d '1 hour ago' {ghost} {keeper}")
    subprocess.run(tb.as_user(ALICE, "sh", "-c", script), check=True, cwd="/")
    return ghost, keeper


def _make_job_files() -> tuple[list[Path], list[Path]]:
    jobs = STATE_DIR / "jobs" / ALICE
    jobs.mkdir(parents=True, exist_ok=True)
    old = [jobs / "sb-sbalice-gone-000001.sh", jobs / "sb-sbalice-gone-000001.log"]
    fresh = [jobs / "sb-sbalice-recent-000002.sh", jobs / "sb-sbalice-recent-000002.log"]
    month_ago = time.time() - 30 * 86400
    for path in old + fresh:
        path.write_text("x\n")
    for path in old:
        os.utime(path, (month_ago, month_ago))
    return old, fresh


def _make_home_logs() -> tuple[list[Path], list[Path]]:
    """Job logs in alice's own job dir (``slurm.job_dir``): one past the retention, one not.
    Logs that earlier runs on this machine left there and that are past the retention, or
    within an hour of it (they would cross it while this module runs), are removed first:
    this module's world is what it made."""
    jobs = Path(f"/home/{ALICE}/.sbroker/jobs")
    for path in jobs.glob("sb-*.log"):
        if path.stat().st_mtime < time.time() - 86400 + 3600:
            path.unlink()
    old, fresh = jobs / "sb-sbalice-gone-000003.log", jobs / "sb-sbalice-recent-000004.log"
    subprocess.run(tb.as_user(ALICE, "sh", "-c", f"mkdir -p {jobs} && echo x > {old} && echo x > {fresh} && "
                              f"touch -d '30 days ago' {old}"), check=True, cwd="/")
    return [old], [fresh]


@pytest.fixture(scope="module")
def leftovers(start_broker):
    start_broker("[reaper]\ninterval = 0\nretention = 86400\n", timeouts_start=START_TIMEOUT)
    job_id = _submit_orphan()
    ghost, keeper = _make_ghost_and_keeper()
    old, fresh = _make_job_files()
    home_old, home_fresh = _make_home_logs()
    old, fresh = old + home_old, fresh + home_fresh
    wait_for(lambda: [j for j in jobs_of(ALICE) if j["job_id"] == job_id and j["state"] == "RUNNING"], 30,
             "the orphan job to run")
    time.sleep(START_TIMEOUT + 1.5)
    yield {"job_id": job_id, "ghost": ghost, "keeper": keeper, "old": old, "fresh": fresh}
    subprocess.run(["rm", "-rf", str(ghost), str(keeper)])


def test_dry_run_reports_and_removes_nothing(leftovers):
    report = json.loads(sbroker(tb.ADMIN, "reap", "--dry-run", "--json").stdout)
    assert report["dry_run"] is True
    assert [j["job_id"] for j in report["orphan_jobs"]] == [leftovers["job_id"]]
    # (other runs may have left their own stale sb-* dirs: those are fair game too)
    assert GHOST in [i["instance"] for i in report["stale_instances"]]
    assert "my-own-instance" not in [i["instance"] for i in report["stale_instances"]]
    assert sorted(f["path"] for f in report["old_job_files"]) == sorted(str(p) for p in leftovers["old"])
    assert [j["job_id"] for j in jobs_of(ALICE)] == [leftovers["job_id"]]
    assert leftovers["ghost"].exists() and all(p.exists() for p in leftovers["old"])


def test_reap_removes_leftovers_keeps_the_rest_and_reports(leftovers):
    result = sbroker(tb.ADMIN, "reap")
    assert re.search(r"reap: 1 orphan jobs, \d+ stale instance dirs, 3 old job files", result.stdout), result.stdout
    for path in leftovers["old"]:  # each with its age, wherever it was
        assert re.search(rf"old job file {re.escape(str(path))} \(30\.0 days\): removed", result.stdout), result.stdout
    assert f"orphan job {leftovers['job_id']}" in result.stdout
    wait_for(lambda: not jobs_of(ALICE), 30, "the orphan job to be cancelled")
    assert not leftovers["ghost"].exists()
    assert leftovers["keeper"].exists()              # not ours (no sb- prefix): never touched
    assert not any(p.exists() for p in leftovers["old"])
    assert all(p.exists() for p in leftovers["fresh"])
    reaps = [e for e in audit_entries() if e["event"] == "reap" and not e["dry_run"]]
    assert reaps and reaps[-1]["orphan_jobs"] == 1 and reaps[-1]["jobs"] == [leftovers["job_id"]]
    assert str(leftovers["ghost"]) in reaps[-1]["instances"] and reaps[-1]["old_job_files"] == 3
    kill = [e for e in audit_entries() if e["event"] == "kill" and e.get("job_id") == leftovers["job_id"]]
    assert kill and kill[0]["by"] == "sbroker"
    # A second pass finds nothing.
    again = json.loads(sbroker(tb.ADMIN, "reap", "--json").stdout)
    assert (again["orphan_jobs"], again["stale_instances"], again["old_job_files"]) == ([], [], [])
