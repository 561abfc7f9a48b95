"""A transfer served on the login node needs no session (issue 19): through the real sshd, SLURM
and users, with the product's default ``[transfer] login_side = true`` (the test bed's
integration config turns it off for the other tests).

``ssh host 'cat > f'`` and sftp of files in the home neither create nor wait for a session (no
job is submitted); a login node whose server cannot be run (here: the configured sftp-server
does not exist) falls back to the session's path, which then creates the session as before.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import config as tb
from tests.hostile._peer import broker_with
from tests.integration.conftest import jobs_of, sbroker_json
from tests.integration.daemon import LOG_PATH, reset_state

from .conftest import ALICE, ssh

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

HOME = Path(f"/home/{ALICE}")


@pytest.fixture
def fresh(cluster) -> Iterator[None]:
    yield
    reset_state()


def routed(since: int) -> list[dict]:
    """The broker's ``command_routed`` lines after byte ``since`` of its log."""
    events = []
    with open(LOG_PATH, "rb") as fh:
        fh.seek(since)
        for line in fh:
            try:
                events.append(json.loads(line))
            except ValueError:  # a line that is not the broker's JSON (e.g. an interpreter warning)
                continue
    return [e for e in events if e.get("event") == "command_routed"]


def sessions_of(project: str) -> list[dict]:
    return [s for s in sbroker_json(ALICE, "ls") if s["project"] == project]  # type: ignore[union-attr]


def test_an_upload_on_shared_storage_creates_no_session_and_submits_no_job(fresh):
    broker = broker_with("", transfer_login_side=True)  # the product's default: the home and project dir
    try:
        project = f"x{secrets.token_hex(3)}"
        target = HOME / f"nosession-{project}.bin"
        data = secrets.token_bytes(64 * 1024)
        since = LOG_PATH.stat().st_size
        done = ssh(ALICE, f"cat > {target.name}", input=data, env={"SBROKER_PROJECT": project},
                   opts=("-o", "SendEnv=SBROKER_PROJECT"))
        assert done.returncode == 0, done.stderr
        assert target.read_bytes() == data
        assert [(e["where"], e["program"], e["project"]) for e in routed(since)] == [("login", "cat", project)]
        assert sessions_of(project) == []
        assert jobs_of(ALICE) == []
        target.unlink()
    finally:
        broker.stop()


def test_a_server_the_login_node_cannot_run_falls_back_to_the_session(fresh):
    broker = broker_with("", transfer_login_side=True, transfer_sftp_server="/nonexistent/sftp-server")
    try:
        project = f"y{secrets.token_hex(3)}"
        name = f"fallback-{project}.txt"
        source = Path(f"/tmp/{name}")
        source.write_bytes(b"through the allocation\n")
        since = LOG_PATH.stat().st_size
        done = subprocess.run(["sftp", "-b", "-", *tb.SSH_OPTS, "-o", "SendEnv=SBROKER_PROJECT",
                               f"{ALICE}@{tb.SSH_HOST}"], input=f"put {source} {name}\n".encode(),
                              capture_output=True, timeout=180, env={"PATH": "/usr/bin:/bin", "SBROKER_PROJECT": project})
        assert done.returncode == 0, done.stderr
        assert (HOME / name).read_bytes() == b"through the allocation\n"
        # The broker offered the login node first; the login could not run it, asked again, and
        # the session (created now) ran the transfer.
        assert [e["where"] for e in routed(since)] == ["login"]
        shown = sessions_of(project)
        assert [s["state"] for s in shown] == ["ready"]
        (HOME / name).unlink()
        source.unlink()
    finally:
        broker.stop()
