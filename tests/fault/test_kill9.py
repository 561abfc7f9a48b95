"""``kill -9`` of the broker with a session in every state, ten times, then restart.

Each round brings one fresh session into each state, holds it there with a gate (see
``conftest``), kills the daemon with SIGKILL, reopens the gates and restarts it:

==============  ===========================================================================
state at kill   how it is held there
==============  ===========================================================================
requested+job   ``sbatch`` ran, its output (the job id) held back: the store only has the
                instance name, SLURM has the job
submitted       ``squeue`` held: the poller never saw the job (partition down: it pends)
pending         partition ``compute`` DOWN: the job pends, the poller has seen it
starting        ``apptainer instance start`` held inside the running job
ready           nothing held
attached        a writer attached (``srun --pty`` shell bridged by the broker)
ending          ``kill`` op sent, ``scancel`` held: the store says ending, the job runs
==============  ===========================================================================

After every restart: no session lost (every live one in the store comes back and is
ready, or ended if it was ending), no duplicate allocation (one active tagged job per
user and project, the session's), no orphaned job (every active tagged job belongs to
a live session), no orphaned instance (the stand-in's instance state lists exactly the
live sessions' instances), no leftover interactive step of the attached shell.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import time

import pytest

from tests.cluster import config as tb
from tests.integration.conftest import client_as, ensure_as

from .conftest import (ALICE, BOB, active_tagged_jobs, close_gate, instances_of, open_all_gates, peer_argv,
                       scontrol, steps_of, store_rows, wait_for)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROUNDS = int(os.environ.get("SBROKER_FAULT_ROUNDS", "10"))


def store_state(sid_or_key) -> str | None:
    rows = store_rows()
    if isinstance(sid_or_key, tuple):
        live = [r for r in rows.values() if (r["user"], r["project"]) == sid_or_key
                and r["state"] not in ("ended", "failed")]
        return live[0]["state"] if live else None
    row = rows.get(sid_or_key)
    return row["state"] if row else None


def row_for(key: tuple[str, str]) -> dict | None:
    live = [r for r in store_rows().values() if (r["user"], r["project"]) == key
            and r["state"] not in ("ended", "failed")]
    return live[0] if live else None


def background(pool, user, project):
    return pool.submit(ensure_as, user, project)


@pytest.mark.timeout(1800)
def test_kill9_in_every_state_loses_nothing(gated_broker):
    proc = gated_broker
    pool = concurrent.futures.ThreadPoolExecutor(8)
    report: dict[str, int] = {}
    try:
        for rnd in range(ROUNDS):
            one_round(proc, pool, rnd, report)
    finally:
        open_all_gates()
        scontrol("update", f"partitionname={tb.PARTITION}", "state=UP")
        pool.shutdown(wait=False, cancel_futures=True)
    assert report == {state: ROUNDS for state in
                      ("requested", "submitted", "pending", "starting", "ready", "attached", "ending")}, report


def one_round(proc, pool, rnd: int, report: dict[str, int]) -> None:
    keys = {"ready": (ALICE, f"r{rnd}"), "attached": (BOB, f"a{rnd}"), "ending": (ALICE, f"e{rnd}"),
            "starting": (BOB, f"s{rnd}"), "pending": (ALICE, f"p{rnd}"), "submitted": (BOB, f"u{rnd}"),
            "requested": (ALICE, f"q{rnd}")}
    # ready, attached, ending: three ready sessions first
    ready = list(pool.map(lambda k: ensure_as(*k), [keys["ready"], keys["attached"], keys["ending"]]))
    for reply in ready:
        assert reply["type"] == "result" and reply["session"]["state"] == "ready", reply
    sessions = {name: r["session"] for name, r in zip(("ready", "attached", "ending"), ready)}
    attacher = subprocess.Popen(peer_argv(BOB, "attach", sessions["attached"]["id"]), stdout=subprocess.PIPE,
                                text=True, cwd="/")
    line = json.loads(attacher.stdout.readline())
    assert line["type"] == "attached", line
    wait_for(lambda: len(steps_of(sessions["attached"]["job_id"])) >= 2, 15, what="the attached shell's step")
    # ending: kill op sent, scancel held
    close_gate("scancel")
    killer = subprocess.Popen([*client_as(ALICE), "kill", sessions["ending"]["id"]], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd="/")
    wait_for(lambda: store_state(sessions["ending"]["id"]) == "ending", 10, what="ending in the store")
    # starting: instance start held inside the running job
    close_gate("apptainer")
    futures = [background(pool, *keys["starting"])]
    wait_for(lambda: store_state(keys["starting"]) == "starting", 20, what="starting in the store")
    # pending: the partition is down
    scontrol("update", f"partitionname={tb.PARTITION}", "state=DOWN")
    futures.append(background(pool, *keys["pending"]))
    wait_for(lambda: store_state(keys["pending"]) == "pending", 20, what="pending in the store")
    # submitted: the poller's squeue is held
    close_gate("squeue")
    futures.append(background(pool, *keys["submitted"]))
    wait_for(lambda: store_state(keys["submitted"]) == "submitted", 20, what="submitted in the store")
    # requested with a job: sbatch has submitted, the broker has not heard the id
    close_gate("sbatch")
    futures.append(background(pool, *keys["requested"]))
    wait_for(lambda: row_for(keys["requested"]), 10, what="requested row")
    wait_for(lambda: row_for(keys["requested"])["instance"], 10, what="instance name chosen")
    instance = row_for(keys["requested"])["instance"]
    wait_for(lambda: any(j["instance"] == instance for j in active_tagged_jobs()), 20,
             what="the held sbatch's job in SLURM")

    before = {r["id"]: r for r in store_rows().values() if r["state"] not in ("ended", "failed")}
    at_kill = {name: store_state(key if name not in sessions else sessions[name]["id"])
               for name, key in keys.items()}
    assert at_kill == {"requested": "requested", "submitted": "submitted", "pending": "pending",
                       "starting": "starting", "ready": "ready", "attached": "ready", "ending": "ending"}, at_kill
    proc.kill9()
    for name in at_kill:
        report[name] = report.get(name, 0) + 1

    open_all_gates()
    scontrol("update", f"partitionname={tb.PARTITION}", "state=UP")
    rest = [json.loads(x) for x in attacher.stdout.read().splitlines() if x.strip()]
    assert not rest or rest[-1]["type"] == "_closed", rest  # the broker's end closed the attachment
    attacher.wait(10)
    killer.wait(10)
    for f in futures:
        f.result(timeout=60)  # the clients saw the broker go away; their replies do not matter
    proc.start()

    ending_id = sessions["ending"]["id"]
    live_ids = set(before) - {ending_id}

    def settled():
        rows = store_rows()
        return (all(rows[sid]["state"] == "ready" for sid in live_ids)
                and rows[ending_id]["state"] == "ended") and rows
    rows = wait_for(settled, 40, interval=0.2,
                    what=lambda: f"round {rnd}: every session ready again and the ending one ended "
                                 f"({ {s: store_rows()[s]['state'] for s in before} })")
    # no session lost, none replaced
    assert {r["id"] for r in rows.values() if r["state"] not in ("ended", "failed")} == live_ids
    for sid in live_ids:
        if before[sid]["job_id"]:
            assert rows[sid]["job_id"] == before[sid]["job_id"], (sid, before[sid], rows[sid])
    live = {sid: rows[sid] for sid in live_ids}
    by_key = {(r["user"], r["project"]): r for r in live.values()}

    # no duplicate, no orphaned job
    def jobs_match():
        jobs = active_tagged_jobs()
        return sorted(j["job_id"] for j in jobs) == sorted(r["job_id"] for r in live.values()) and jobs
    jobs = wait_for(jobs_match, 20, what=lambda: f"round {rnd}: active tagged jobs == live sessions' jobs "
                    f"({active_tagged_jobs()} vs {[r['job_id'] for r in live.values()]})")
    for job in jobs:
        assert by_key[(job["user"], job["project"])]["job_id"] == job["job_id"]
    # no orphaned instance
    for user in (ALICE, BOB):
        want = {r["instance"] for r in live.values() if r["user"] == user}
        wait_for(lambda: instances_of(user) == want, 20,
                 what=lambda: f"round {rnd}: {user}'s instances == live sessions' ({instances_of(user)} vs {want})")
    # the attached shell's interactive step went with the broker's pty
    job = sessions["attached"]["job_id"]
    wait_for(lambda: all(s.endswith((".batch", ".extern")) for s in steps_of(job)), 20,
             what=lambda: f"no interactive step left in job {job} ({steps_of(job)})")
    # a second login finds the same session (no new allocation)
    again = list(pool.map(lambda k: ensure_as(*k), list(by_key)))
    for reply in again:
        assert reply["type"] == "result", reply
        key = (reply["session"]["user"], reply["session"]["project"])
        assert reply["session"]["id"] == by_key[key]["id"]
        assert reply["session"]["job_id"] == by_key[key]["job_id"]
    # clean slate for the next round, through the broker's own kill path
    kills = [subprocess.Popen([*client_as(tb.ADMIN), "kill", sid], stdout=subprocess.DEVNULL, cwd="/")
             for sid in live_ids]
    for k in kills:
        assert k.wait(60) == 0
    wait_for(lambda: not active_tagged_jobs(), 30, what="all jobs of the round gone")
    wait_for(lambda: not instances_of(ALICE) and not instances_of(BOB), 20, what="all instances stopped")
    time.sleep(0)
