"""Shared pytest fixtures.

``cluster`` (session): the real local test bed (SLURM + munge + loopback sshd), brought up
once per session via ``tests.cluster.up()``. It is left running afterwards so reruns are
fast; set ``SBROKER_TESTBED_DOWN=1`` (CI does, via CI=true) to tear it down at the end.
Mark tests that need it with ``@pytest.mark.cluster``; the marker pulls the fixture in.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def cluster():
    from tests import cluster as testbed
    from tests.cluster import config

    if os.geteuid() != 0:
        pytest.fail("cluster tests need root (the test bed creates users and starts daemons)")
    try:
        testbed.up()
    except testbed.HarnessError as e:
        pytest.fail(f"the test bed did not come up:\n{e}", pytrace=False)
    yield config
    if os.environ.get("SBROKER_TESTBED_DOWN") == "1" or os.environ.get("CI") == "true":
        testbed.down()


@pytest.fixture(autouse=True)
def _cluster_marker(request):
    """``@pytest.mark.cluster`` implies the ``cluster`` fixture."""
    if request.node.get_closest_marker("cluster"):
        request.getfixturevalue("cluster")
