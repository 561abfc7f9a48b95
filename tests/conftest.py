"""Shared pytest fixtures.

``cluster`` (session): the real local test bed (SLURM + munge + loopback sshd), brought up
once per session via ``tests.cluster.up()``. It is left running afterwards so reruns are
fast; set ``SBROKER_TESTBED_DOWN=1`` (CI does, via CI=true) to tear it down at the end.
Mark tests that need it with ``@pytest.mark.cluster``; the marker pulls the fixture in.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest


LOCK_WAIT = 3600.0


@pytest.fixture(scope="session")
def cluster():
    from tests import cluster as testbed
    from tests.cluster import config

    if os.geteuid() != 0:
        pytest.fail("cluster tests need root (the test bed creates users and starts daemons)")
    # One pytest run at a time uses the test bed (one broker socket, shared users and
    # jobs): a second run on the same machine waits here instead of fighting the first.
    lock_path = Path("/run/sbroker-testbed-tests.lock")
    lock = open(lock_path, "w")
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                pytest.fail(f"another test run held {lock_path} for over {LOCK_WAIT:g}s", pytrace=False)
            time.sleep(1)
    try:
        testbed.up()
    except testbed.HarnessError as e:
        pytest.fail(f"the test bed did not come up:\n{e}", pytrace=False)
    try:
        yield config
        if os.environ.get("SBROKER_TESTBED_DOWN") == "1" or os.environ.get("CI") == "true":
            testbed.down()
    finally:
        lock.close()


@pytest.fixture(autouse=True)
def _cluster_marker(request):
    """``@pytest.mark.cluster`` implies the ``cluster`` fixture."""
    if request.node.get_closest_marker("cluster"):
        request.getfixturevalue("cluster")
