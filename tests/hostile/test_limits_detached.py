"""Issue 14 item 4, detached shells: beyond ``limits.detached_shells_per_user`` the oldest
detached shell is ended. (Its own module: ``test_limits``' module-scoped daemon has other limits.)"""

from __future__ import annotations

import json

import pytest

from tests.cluster import config as tb
from tests.integration import daemon as bed
from tests.integration.conftest import ensure_as

from ._peer import attach_once, broker_with

BOB = tb.USERS[1]


@pytest.mark.cluster
def test_detached_shells_beyond_the_limit_end_oldest_first(cluster):
    """``limits.detached_shells_per_user = 1``: bob drops his shell in p1, then in p2; the p1
    shell (the older detached one) is ended, the p2 shell is kept for him to reattach."""
    proc = broker_with("[limits]\ndetached_shells_per_user = 1\n")
    offset = bed.LOG_PATH.stat().st_size
    try:
        ids = {p: ensure_as(BOB, p)["session"]["id"] for p in ("p1", "p2")}
        for project in ("p1", "p2"):   # attach a shell, then drop it (detach): kept for a reattach
            first = attach_once(BOB, {"session": ids[project], "mode": "write", "rows": 24, "cols": 80})
            assert (first["type"], first["reattached"]) == ("attached", False), first
        with open(bed.LOG_PATH, "rb") as fh:
            fh.seek(offset)
            events = [json.loads(line) for line in fh.read().splitlines() if line.startswith(b"{")]
        ended = [e["session"] for e in events if e.get("event") == "limit_detached"]
        assert ended == [ids["p1"]], ended
        again = {p: attach_once(BOB, {"session": ids[p], "mode": "write", "rows": 24, "cols": 80})
                 for p in ("p2", "p1")}
        assert again["p2"]["reattached"] is True     # the newer detached shell was kept
        assert again["p1"]["reattached"] is False    # the older one had been ended: a new shell
    finally:
        proc.stop()
        bed.reset_state()
