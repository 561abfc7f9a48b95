"""The operations plane: idle and walltime policy, the reaper's schedule, metrics, loop lag, ``reap``.

What it owns: the decisions *when* to warn and *when* to end a session for policy
reasons, and the wiring of :mod:`broker.reaper` and :mod:`broker.metrics` into the
daemon. What it must not do: change session state itself (it ends sessions only
through ``manager.kill``) or run SLURM commands other than through the manager's
runner (the reaper does that).

Policy, checked every :data:`TICK` seconds for every ready session:

* **Idle** (``timeouts.idle`` > 0): a session with no attached terminal and no
  input, attach or login for ``timeouts.idle`` seconds is warned (audit
  ``idle_warning``, log, a ``notice`` event to anyone waiting on it), and if it is
  still idle ``timeouts.idle_grace`` seconds later it is ended cleanly (job
  cancelled, so the start script's trap stops the instance). A session with an
  attacher is never culled; any activity after the warning cancels it.
  Terminals and input are the session agent's to know (its status file, read through
  :class:`broker.agents.Agents`, at most every 10 s); before warning, SLURM is asked
  whether any step runs in the job (a command through some login node).
* **Walltime** (``timeouts.walltime_warnings``): the agent warns its terminals itself
  (it reads the job's end from ``squeue``); the broker carries no terminal to write to.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from . import log as _log
from .agents import Agents
from .attach import AttachHub
from .looplag import LoopLag
from .manager import Manager, SessionError
from .metrics import Metrics
from .reaper import Reaper
from .server import Connection, Server, StartupError
from .session import Session, State

TICK = 1.0


class Operations:
    def __init__(self, manager: Manager, server: Server, hub: AttachHub, agents: Agents) -> None:
        self.manager = manager
        self.server = server
        self.config = manager.config
        self.hub = hub
        self.agents = agents
        self.log = _log.get("sbroker.ops")
        self.counts: collections.Counter[str] = collections.Counter()
        self.reaper = Reaper(manager)
        #: The daemon's own event-loop lag, read by the metrics.
        self.looplag = LoopLag()
        self.metrics = Metrics(manager, hub, self, agents)
        self._idle_warned: dict[str, float] = {}
        self._seen_attached: dict[str, float] = {}
        self._reap_lock = asyncio.Lock()
        server.handlers["reap"] = self.op_reap
        server.on_ensured.append(self._observe_ensure)
        server.describers.append(self.describe)
        self._tasks = [asyncio.ensure_future(self._start_metrics()), asyncio.ensure_future(self._policy_loop()),
                       asyncio.ensure_future(self.looplag.run())]
        if self.config.reaper_interval > 0:
            self._tasks.append(asyncio.ensure_future(self._reaper_loop()))

    # ------------------------------------------------------------------ wiring

    def _observe_ensure(self, session: Session, warm: bool, seconds: float) -> None:
        """The time-to-shell histogram: cold = this login waited for a new session."""
        self.metrics.time_to_shell.labels("warm" if warm else "cold").observe(seconds)

    async def _start_metrics(self) -> None:
        try:
            await self.metrics.start()
        except (OSError, StartupError) as exc:
            self.log.error("metrics_unavailable", error=str(exc), socket=self.config.metrics_socket,
                           port=self.config.metrics_port)

    def describe(self, session: Session) -> dict[str, Any]:
        """Policy fields for ``ls``/``show``."""
        warned = self._idle_warned.get(session.id)
        data: dict[str, Any] = {"idle_warned": warned is not None}
        if warned is not None:
            data["idle_ends_in"] = round(max(0.0, warned + self.config.idle_grace - time.time()), 1)
        return data

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        await self.metrics.close()

    # ------------------------------------------------------------------ policy

    async def _policy_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                await self.tick(time.time())
            except Exception:  # a policy bug must not stop the loop (or the daemon)
                self.log.exception("policy_failed")

    async def tick(self, now: float) -> None:
        live = set()
        for session in list(self.manager.by_key.values()):
            live.add(session.id)
            if session.state != State.READY:
                continue
            status = await self.agents.status_of(session)
            attached = bool(status and status.busy)
            if attached:
                self._seen_attached[session.id] = now
            await self._idle(session, attached, now, status.last_input if status else 0.0,
                             status.last_attach if status else 0.0)
        self.agents.prune(live)
        for table in (self._idle_warned, self._seen_attached):
            for sid in [sid for sid in table if sid not in live]:
                del table[sid]

    def _last_active(self, session: Session, *agent_times: float) -> float:
        return max(session.last_activity, session.ready_at, *agent_times,
                   self._seen_attached.get(session.id, 0.0))

    async def _idle(self, session: Session, attached: bool, now: float, last_input: float = 0.0,
                    last_attach: float = 0.0) -> None:
        limit = self.config.idle_timeout
        warned = self._idle_warned.get(session.id)
        if not limit or attached:
            if warned is not None:
                self._clear_idle(session, "attached")
            return
        last = self._last_active(session, min(last_input, now), min(last_attach, now))
        if warned is not None and last > warned:
            self._clear_idle(session, "activity")
            warned = None
        idle = now - last
        if idle < limit:
            return
        steps = await self.manager.job_has_steps(session)
        if steps is None:
            return  # SLURM did not answer: no evidence either way, end nothing
        if steps:
            # A shell or command runs in the job, attached through some login node (perhaps
            # another one's broker): that is activity this broker does not see by itself.
            self._seen_attached[session.id] = now
            self.log.info("idle_deferred", session=session.id, user=session.user, job_id=session.job_id,
                          why="an srun step runs in the job (attached through some login node)")
            if warned is not None:
                self._clear_idle(session, "attached elsewhere")
            return
        grace = self.config.idle_grace
        if warned is None:
            self._idle_warned[session.id] = warned = now
            self.counts["idle_warning"] += 1
            text = (f"session idle for {idle:.0f}s (limit {limit:g}s) with nothing attached; "
                    f"it will be ended in {grace:g}s unless you log in")
            self.manager.audit.record("idle_warning", user=session.user, project=session.project,
                                      session=session.id, job_id=session.job_id, idle=round(idle, 1),
                                      limit=limit, ends_in=grace)
            self.log.warning("idle_warning", session=session.id, user=session.user, project=session.project,
                             job_id=session.job_id, idle=round(idle, 1), limit=limit, ends_in=grace)
            self._notice(session, text)
        if now - warned < grace:
            return
        del self._idle_warned[session.id]
        self.counts["idle_end"] += 1
        reason = f"idle for {idle:.0f}s (limit {limit:g}s), nothing attached"
        self.log.warning("idle_end", session=session.id, user=session.user, project=session.project,
                         job_id=session.job_id, idle=round(idle, 1))
        await self.manager.kill(session, by="sbroker", by_uid=0, reason=reason)

    def _clear_idle(self, session: Session, why: str) -> None:
        self._idle_warned.pop(session.id, None)
        self.manager.audit.record("idle_warning_cleared", user=session.user, project=session.project,
                                  session=session.id, why=why)
        self.log.info("idle_warning_cleared", session=session.id, why=why)

    def _notice(self, session: Session, text: str) -> None:
        """A ``notice`` event for anyone subscribed to the session (e.g. a login waiting on it)."""
        notify = getattr(self.manager, "_notify", None)
        if notify is not None:
            notify(session, {"type": "notice", "text": text})


    # ------------------------------------------------------------------ reaper

    async def _reaper_loop(self) -> None:
        await asyncio.sleep(min(60.0, self.config.reaper_interval))
        while True:
            try:
                await self.reap()
            except Exception:
                self.log.exception("reaper_failed")
            await asyncio.sleep(self.config.reaper_interval)

    async def reap(self, dry_run: bool = False) -> dict[str, Any]:
        async with self._reap_lock:
            return await self.reaper.run_once(dry_run=dry_run)

    async def op_reap(self, conn: Connection, message: dict[str, Any]) -> None:
        if not conn.admin:
            raise SessionError("forbidden", f"reap: only members of {self.config.admin_group} may run the reaper")
        dry_run = message.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ValueError("dry_run: must be true or false")
        self.manager.audit.record("reap_requested", user=None, by=conn.user.name, peer_uid=conn.user.uid,
                                  dry_run=dry_run)
        report = await self.reap(dry_run=dry_run)
        await conn.send({"type": "result", "report": report})
