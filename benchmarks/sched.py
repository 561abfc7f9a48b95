"""Scheduler load: the broker's one batched ``squeue`` per cycle vs one ``squeue -j`` per session."""

from __future__ import annotations

import asyncio
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from broker.audit import Audit
from broker.config import Config
from broker import manager as manager_module
from broker.manager import Manager
from broker.session import Session, State
from broker.slurm.runner import Runner
from broker.store import Store
from tests.cluster import config as tb

from . import bed
from .common import Row, log

CYCLE = 1.0
#: Windows per side for each N (interleaved): the row's n.
WINDOWS = 3
_RPC_RE = re.compile(r"^\s+(\S+)\s+\(\s*\d+\)\s+count:(\d+)")


def sdiag_reset() -> None:
    bed.slurm("sdiag", "--reset")


def sdiag_rpcs() -> dict[str, int]:
    """RPC counts by message type since the last reset (``sdiag`` as root)."""
    out = bed.slurm("sdiag").stdout
    counts: dict[str, int] = {}
    section = False
    for line in out.splitlines():
        if line.startswith("Remote Procedure Call statistics by message type"):
            section = True
            continue
        if line.startswith("Remote Procedure Call statistics by user"):
            break
        m = _RPC_RE.match(line) if section else None
        if m:
            counts[m.group(1)] = int(m.group(2))
    return counts


def submit_held(n: int) -> list[str]:
    """N tiny held jobs (pending, never started: no slurmstepd, no CPU) as the admin user."""
    script = (f"for i in $(seq {n}); do sbatch --parsable --hold --mem=10M -n1 -t 10 -J sbbench-load "
              "-o /dev/null --wrap 'sleep 600' || exit 1; done")
    out = bed.as_user(tb.ADMIN, "bash", "-c", script, timeout=600).stdout
    return [line.split(";")[0] for line in out.split()]


async def _broker_window(job_ids: list[str], seconds: float, tmp: Path) -> int:
    cfg = Config(image="/nonexistent.sif", state_dir=tmp, poll_interval=CYCLE, slurm_conf=str(tb.SLURM_CONF),
                 path=bed.PATH, gone_grace=3600)
    runner = Runner(path=bed.PATH, slurm_conf=str(tb.SLURM_CONF))
    mgr = Manager(cfg, runner, Store(tmp / "sessions.db"), Audit(tmp / "audit.jsonl"))
    # The jobs are held, so the sessions are pending (a ready session whose job pends again is
    # treated as requeued and ended). Pending sessions make the poller use its fast cycle; pin
    # that to CYCLE too, so both sides poll once per CYCLE.
    manager_module.FAST_POLL = CYCLE
    for i, job_id in enumerate(job_ids):
        s = Session(user=tb.ADMIN, uid=0, project=f"p{i}", job_id=job_id, instance=f"sb-x-p{i}-000000",
                    state=State.PENDING, node="n", submitted_at=time.time())
        mgr._track(s)
    task = asyncio.ensure_future(mgr.run_poller())
    await asyncio.sleep(seconds)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    mgr.store.close()
    return runner.calls["squeue"]


async def _peer_window(job_ids: list[str], seconds: float) -> int:
    """One ``squeue -j ID`` per session per cycle (batchspawner's query), one at a time."""
    env = tb.slurm_env({"PATH": "/usr/bin:/bin"})
    calls = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        cycle_start = time.monotonic()
        for job_id in job_ids:
            if time.monotonic() >= end:
                break
            proc = await asyncio.create_subprocess_exec("squeue", "-h", "-j", job_id, "-o", "%T %B", env=env,
                                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await proc.wait()
            calls += 1
        await asyncio.sleep(max(0.0, CYCLE - (time.monotonic() - cycle_start)))
    return calls


def _rpc_total(counts: dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if k != "REQUEST_STATS_INFO")


def scheduler_load(ns: list[int], seconds: float, windows: int = WINDOWS) -> list[Row]:
    """For each N: ``windows`` windows of ``seconds`` per side, interleaved (broker, peer, peer,
    broker, ...), each with the controller's RPC counters reset at its start."""
    from broker import log as _log

    _log.configure("warning")
    ids = submit_held(max(ns))
    log(f"scheduler load: {len(ids)} held jobs submitted")
    rows = []
    per_min = 60.0 / seconds
    cycles = seconds / CYCLE
    try:
        for k, n in enumerate(ns):
            sq: dict[str, list[float]] = {"broker": [], "peer": []}
            rpc: dict[str, list[float]] = {"broker": [], "peer": []}
            detail: dict[str, list[dict[str, int]]] = {"broker": [], "peer": []}
            for w in range(windows):
                for side in ("broker", "peer") if (k + w) % 2 == 0 else ("peer", "broker"):
                    sdiag_reset()
                    with tempfile.TemporaryDirectory(prefix="sbroker-bench-sched-") as tmp:
                        if side == "broker":
                            calls = asyncio.run(_broker_window(ids[:n], seconds, Path(tmp)))
                        else:
                            calls = asyncio.run(_peer_window(ids[:n], seconds))
                    rpcs = sdiag_rpcs()
                    sq[side].append(calls * per_min)
                    rpc[side].append(_rpc_total(rpcs) * per_min)
                    detail[side].append(rpcs)
            worst = max(sq["broker"]) / per_min / cycles       # squeue per cycle, worst window
            per_cycle = statistics.median(sq["broker"]) / per_min / cycles
            rows.append(Row("sched", f"scheduler load, N = {n} tracked sessions: `squeue` calls per minute "
                            f"(broker poller vs per-session loop), {CYCLE:g} s cycle", "calls/min", sq["broker"],
                            sq["peer"], goal="1 query per cycle, flat in N", met=worst <= 1.15 + 1 / cycles,
                            ratio=per_cycle, ratio_label="broker squeue per cycle",
                            note=f"{windows} windows of {seconds:g} s per side, interleaved; controller RPCs/min "
                                 f"(sdiag), median: broker {statistics.median(rpc['broker']):.0f}, per-session "
                                 f"loop {statistics.median(rpc['peer']):.0f}; worst broker window "
                                 f"{worst:.2f} squeue per cycle",
                            extra={"n_sessions": n, "window_s": seconds, "windows": windows,
                                   "rpc_per_min": rpc, "rpc_by_type": detail}))
            log(f"sched N={n}: broker squeue/min {[round(v) for v in sq['broker']]} rpc/min "
                f"{[round(v) for v in rpc['broker']]}; peer squeue/min {[round(v) for v in sq['peer']]} rpc/min "
                f"{[round(v) for v in rpc['peer']]}")
    finally:
        bed.as_user(tb.ADMIN, "scancel", "--name=sbbench-load", check=False)
        bed.wait_jobs_gone(ids, timeout=60)
    return rows
