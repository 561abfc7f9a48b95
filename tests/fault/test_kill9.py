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
attached        a login's terminal on the session's shell: ``sbroker login`` (sshd's
                ForceCommand) sent ``ensure`` with ``attach`` and runs the ``srun --overlap
                --pty ... agent.py attach`` of the reply; the shell is the session agent's,
                in the allocation (issue 15), and no byte of the terminal passes the broker
ending          ``kill`` op sent, ``scancel`` held: the store says ending, the job runs
==============  ===========================================================================

At the kill, every client waiting on the broker (the ``kill``, the ``ensure`` of each
held state) is told the broker closed the connection, and the attached terminal goes on:
its shell answers while no broker runs. After every restart: no session lost (every
live one in the store comes back and is ready, or ended if it was ending), no duplicate
allocation (one active tagged job per user and project, the session's), no orphaned job
(every active tagged job belongs to a live session), no orphaned instance (the stand-in's
instance state lists exactly the live sessions' instances); the attached terminal is on
the same ``srun`` step and the same shell, exits with its shell's status, shows nothing
but the shell's own output (no ``sbroker:`` or ``srun:`` line), and its step goes with it.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import subprocess

import pexpect
import pytest

from tests.cluster import config as tb
from tests.integration.conftest import client_as, ensure_as

from .conftest import (ALICE, BOB, active_tagged_jobs, close_gate, instances_of, interactive_steps,
                       login_terminal, open_all_gates, scontrol, store_rows, wait_for)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROUNDS = int(os.environ.get("SBROKER_FAULT_ROUNDS", "10"))
#: What a client waiting on the broker gets when the broker dies (``broker.client``), as
#: ``ensure_as`` prints it.
CLOSED = {"type": "error", "code": "closed", "message": "broker closed the connection"}


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
    terminals: list[pexpect.spawn] = []
    try:
        for rnd in range(ROUNDS):
            one_round(proc, pool, rnd, report, terminals)
    finally:
        for terminal in terminals:
            terminal.close(force=True)
        open_all_gates()
        scontrol("update", f"partitionname={tb.PARTITION}", "state=UP")
        pool.shutdown(wait=False, cancel_futures=True)
    assert report == {state: ROUNDS for state in
                      ("requested", "submitted", "pending", "starting", "ready", "attached", "ending")}, report


def one_round(proc, pool, rnd: int, report: dict[str, int], terminals: list[pexpect.spawn]) -> None:
    keys = {"ready": (ALICE, f"r{rnd}"), "attached": (BOB, f"a{rnd}"), "ending": (ALICE, f"e{rnd}"),
            "starting": (BOB, f"s{rnd}"), "pending": (ALICE, f"p{rnd}"), "submitted": (BOB, f"u{rnd}"),
            "requested": (ALICE, f"q{rnd}")}
    # ready, attached, ending: three ready sessions first
    ready = list(pool.map(lambda k: ensure_as(*k), [keys["ready"], keys["attached"], keys["ending"]]))
    for reply in ready:
        assert reply["type"] == "result" and reply["session"]["state"] == "ready", reply
    sessions = {name: r["session"] for name, r in zip(("ready", "attached", "ending"), ready)}
    terminal = login_terminal(BOB, keys["attached"][1])
    terminals.append(terminal)
    transcript = terminal.logfile_read = io.BytesIO()
    terminal.send(b"echo shell-pid=$$\r")
    terminal.expect(rb"shell-pid=(\d+)\r")
    shell_pid = terminal.match.group(1)
    attached_job = sessions["attached"]["job_id"]
    step = wait_for(lambda: interactive_steps(attached_job), 15, what="the login's srun step in the job")
    # ending: kill op sent, scancel held
    close_gate("scancel")
    killer = subprocess.Popen([*client_as(ALICE), "kill", sessions["ending"]["id"]], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, cwd="/")
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

    # The terminal never went through the broker: its shell answers while no broker runs.
    terminal.send(f"echo during-{rnd}-$((6*7)) pid=$$\r".encode())
    terminal.expect(rb"during-%d-42 pid=(\d+)\r" % rnd)
    assert terminal.match.group(1) == shell_pid
    # Every client waiting on the broker was told it went away (none left hanging, none
    # given an answer the dead broker never decided).
    _, killer_err = killer.communicate(timeout=10)
    assert (killer.returncode, killer_err) == (1, "sbroker: broker closed the connection\n")
    assert [f.result(timeout=10) for f in futures] == [CLOSED] * 4
    open_all_gates()
    scontrol("update", f"partitionname={tb.PARTITION}", "state=UP")
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
    # the attached terminal: the same srun step, the same shell, still answering; it ends with
    # its shell, with the shell's status, and its step goes with it
    assert interactive_steps(attached_job) == step
    terminal.send(f"echo after-{rnd}-$((6*7)) pid=$$\r".encode())
    terminal.expect(rb"after-%d-42 pid=(\d+)\r" % rnd)
    assert terminal.match.group(1) == shell_pid
    terminal.send(b"exit 7\r")
    terminal.expect(pexpect.EOF)
    terminal.wait()
    assert terminal.exitstatus == 7
    # The transcript is everything the terminal printed from its first command to its end
    # (not an empty read): nothing in it came from sbroker or srun.
    seen = transcript.getvalue()
    assert b"shell-pid=" in seen and b"after-%d-42" % rnd in seen and b"exit 7" in seen, seen
    assert b"sbroker:" not in seen and b"srun:" not in seen, seen
    wait_for(lambda: not interactive_steps(attached_job), 20,
             what=lambda: f"no interactive step left in job {attached_job} ({interactive_steps(attached_job)})")
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
