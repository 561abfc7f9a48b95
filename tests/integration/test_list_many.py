"""``sbroker ls`` with a thousand live sessions: the real daemon, the real CLI, every session listed.

The store holds 1,000 ready sessions (half sbalice's, half sbbob's) whose jobs SLURM does not
know; the gone-grace is long, so they stay live while the daemon polls for them. A reply this
size (~0.5 MB) is far above the request bound: it must come back whole, to an administrator
as JSON and as the table, and each user sees exactly their own.
"""

from __future__ import annotations

import time

import pytest

from broker.identity import lookup_name
from broker.session import Session, State
from broker.store import Store
from tests.cluster import config as tb

from .conftest import ALICE, BOB, sbroker, sbroker_json
from .daemon import STATE_DIR, BrokerProcess, reset_state

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

N = 1000


def populate(n: int) -> dict[str, str]:
    """``n`` ready sessions in the bed broker's store; returns ``{session id: user}``."""
    store = Store(STATE_DIR / "sessions.db")
    now = time.time()
    made = {}
    try:
        for i in range(n):
            user = lookup_name((ALICE, BOB)[i % 2])
            instance = f"sb-{user.name}-many{i:04d}-{i:06x}"
            s = Session(user=user.name, uid=user.uid, project=f"many{i:04d}", job_id=str(90_000_000 + i),
                        node="node1", instance=instance, image=str(tb.IMAGES / "base.sif"),
                        image_digest="sha256:" + "0" * 64, state=State.READY, submitted_at=now - 60,
                        running_at=now - 50, ready_at=now - 49,
                        log_path=f"{user.home}/.sbroker/jobs/{instance}.log",
                        script_path=f"{STATE_DIR}/jobs/{user.name}/{instance}.sh")
            store.save(s)
            made[s.id] = user.name
    finally:
        store.close()
    return made


def test_ls_lists_a_thousand_sessions_to_an_admin_and_each_user_their_own(cluster):
    reset_state()
    made = populate(N)
    proc = BrokerProcess(slurm_gone_grace=3600.0)
    proc.start()
    try:
        started = time.monotonic()
        listed = sbroker_json(tb.ADMIN, "ls")
        elapsed = time.monotonic() - started
        assert sorted(s["id"] for s in listed) == sorted(made)
        assert {s["state"] for s in listed} == {"ready"}
        assert all(s["user"] == made[s["id"]] for s in listed)
        assert elapsed < 10, f"ls of {N} sessions took {elapsed:.1f}s"
        for user in (ALICE, BOB):
            mine = sbroker_json(user, "ls")
            assert sorted(s["id"] for s in mine) == sorted(sid for sid, u in made.items() if u == user)
        table = sbroker(tb.ADMIN, "ls").stdout.splitlines()
        assert table[0].split()[:3] == ["USER", "PROJECT", "STATE"] and len(table) == N + 1
        assert sorted(line.split()[1] for line in table[1:]) == [f"many{i:04d}" for i in range(N)]
    finally:
        proc.stop()
        reset_state()
