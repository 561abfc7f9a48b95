"""Instance start failures: the reason reaches the user within 5 s and the job is cancelled.

Two causes: an image file that is not an image, and a configured host mount whose
source does not exist. Each is checked through an ``ensure`` (timed) and through a
real SSH login (the reason on stderr, exit status non-zero); afterwards SLURM has no
job of the user, the stand-in lists no instance and the session is ``failed`` with
the same reason.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.cluster import config as tb
from tests.integration.conftest import ensure_as

from .conftest import ALICE, BrokerProcess, TomlBroker, active_tagged_jobs, instances_of, store_rows, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MISSING = "/nonexistent/sbfault-missing-bind-source"


def check_failure(project: str, expect: list[str]) -> None:
    started = time.monotonic()
    reply = ensure_as(ALICE, project)
    elapsed = time.monotonic() - started
    assert reply["type"] == "error", reply
    for text in expect:
        assert text in reply["message"], reply
    assert elapsed < 5, f"reason took {elapsed:.1f}s"
    wait_for(lambda: not [j for j in active_tagged_jobs() if j["user"] == ALICE], 10, what="the job cancelled")
    assert instances_of(ALICE) == set()
    failed = [r for r in store_rows().values() if r["project"] == project]
    assert failed and all(r["state"] == "failed" for r in failed)
    assert all(any(t in r["reason"] for t in expect) for r in failed)
    # through real sshd: the user sees the reason and a non-zero exit, in a new attempt
    started = time.monotonic()
    ssh = subprocess.run(tb.ssh_command(ALICE, f"@{project}-ssh", "true"), capture_output=True, text=True,
                         timeout=60)
    elapsed = time.monotonic() - started
    assert ssh.returncode != 0, ssh
    assert "instance failed to start" in ssh.stderr and all(t in ssh.stderr for t in expect), ssh.stderr
    assert elapsed < 8, f"ssh login took {elapsed:.1f}s to show the reason"
    wait_for(lambda: not [j for j in active_tagged_jobs() if j["user"] == ALICE], 10, what="the job cancelled")


def test_bad_image(fresh):
    bad = tb.IMAGES / "sbfault-not-an-image.sif"
    bad.write_bytes(b"this is not an image\n" * 10)
    os.chmod(bad, 0o644)
    proc = BrokerProcess(container_image=str(bad), slurm_poll_interval=0.5, slurm_gone_grace=1.0)
    proc.start()
    try:
        check_failure("badimage", ["instance failed to start"])
    finally:
        proc.stop()
        bad.unlink()


def test_missing_bind_source(fresh):
    assert not os.path.exists(MISSING)
    proc = TomlBroker({"container": f'host_mounts = [{{host_path = "{MISSING}", container_path = "/mnt/data", '
                                    f'mode = "ro"}}]'}, slurm_poll_interval=0.5, slurm_gone_grace=1.0)
    proc.start()
    try:
        check_failure("missingbind", ["instance failed to start", MISSING])
    finally:
        proc.stop()
